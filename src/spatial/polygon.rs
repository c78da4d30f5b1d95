//! Exact point-in-polygon for one polygon fence, cheaper than scanning every edge.
//!
//! A [`PolyGrid`] rasterises the polygon's bounding box (in the polygon's unwrapped frame) into
//! cells. A cell that no edge touches is wholly inside or wholly outside, so the answer there is
//! one load. A cell that edges touch keeps those edges and the exact status of its centre; a point
//! in it flips that status once per edge the segment centre → point properly crosses, decided with
//! robust (exact) orientation predicates. Any degenerate case — the point or the centre on an
//! edge's line, the segment through a vertex — falls back to [`Polygon::contains`]'s own test, so
//! the answer is always exactly API.md rule 1.
//!
//! Small polygons (at most [`SMALL_MAX_EDGES`] edges) get no grid: [`SmallPolys`] keeps their
//! vertices as `f32` offsets from an origin (8 bytes a vertex) and tests a point by crossing
//! number, falling back to [`Polygon::contains`] when the point is within the rounding margin of
//! an edge's line.

use geo::algorithm::kernels::{Kernel, Orientation, RobustKernel};
use geo::coordinate_position::{CoordPos, CoordinatePosition};
use geo::Coord;

use crate::domain::geo::{LatLon, Polygon};

/// Cell marker: no edge touches the cell and its centre is inside.
const INSIDE: u32 = u32::MAX;
/// Cell marker: no edge touches the cell and its centre is outside.
const OUTSIDE: u32 = u32::MAX - 1;

/// Cells per edge the grid aims for: enough that a boundary cell holds a couple of edges.
const CELLS_PER_EDGE: usize = 4;
/// Upper bound on cells of one polygon (4 B each), so a huge polygon stays small in memory.
const MAX_CELLS: usize = 1 << 18;

/// Most edges (all rings) of a polygon kept in [`SmallPolys`]; larger ones get a [`PolyGrid`].
/// Measured (10 k polygons over a city, 200 k pings): at 40–93 edges the crossing test is 2.3×
/// faster than the grid and 30× smaller; at 150–375 edges they are equally fast and the grid is
/// 50× larger; the grid wins on speed only beyond that (Beijing's 4 037 vertices: ≈ 60 ns/test).
pub(crate) const SMALL_MAX_EDGES: usize = 256;

/// Compact store of small polygons for an exact crossing-number test.
///
/// A polygon at `at` is `pool[at] = [origin lon, origin lat]` (`f32`, in the polygon's unwrapped
/// frame), `pool[at + 1] = [margin, vertex count as bits]`, then its vertex path as `f32`
/// offsets from the origin: the outer ring (closed), then each hole (closed) followed by a step
/// back to the outer ring's first vertex. The two bridge edges to and from a hole are the same
/// segment both ways, so they cross any ray equally often and cancel in the parity.
///
/// Exactness. Let `ε` bound the rounding of one coordinate of a vertex offset (`f32` half-ulp of
/// the polygon's extent, plus `f64` subtraction error); the query point's offset is computed in
/// `f64` (error ~1e-13, also inside `ε`). So each vertex moves by at most `√2·ε` and the point by
/// at most `√2·ε`. Moving them continuously back to their true positions cannot change the
/// parity unless the point meets the moving boundary, which needs the rounded point within
/// `2·(√2ε + √2ε) ≈ 5.7ε` of the rounded boundary. The test defers whenever the point may be
/// within `margin = 8ε` of an edge's line; otherwise its parity is the true one, i.e. the same
/// answer as [`Polygon::contains`] (even–odd equals inside-or-on for a valid polygon with holes).
#[derive(Debug, Default)]
pub(crate) struct SmallPolys {
    pool: Vec<[f32; 2]>,
}

impl SmallPolys {
    /// Stores `poly` if it is small (≤ [`SMALL_MAX_EDGES`] edges, narrower than 170°); returns
    /// its position.
    pub(crate) fn push(&mut self, poly: &Polygon) -> Option<u32> {
        let g = poly.unwrapped();
        let edges: usize =
            std::iter::once(g.exterior()).chain(g.interiors()).map(|r| r.0.len().saturating_sub(1)).sum();
        let [x0, y0, x1, _] = poly.bbox();
        if edges > SMALL_MAX_EDGES || x1 - x0 >= 170.0 {
            return None;
        }
        let (ox, oy) = (x0 as f32, y0 as f32);
        let origin = Coord { x: ox as f64, y: oy as f64 };
        let outer = &g.exterior().0;
        let mut path: Vec<Coord<f64>> = outer.clone();
        for hole in g.interiors() {
            path.extend_from_slice(&hole.0);
            path.push(outer[0]);
        }
        let mut extent = 0.0f64;
        let mut verts: Vec<[f32; 2]> = Vec::with_capacity(path.len());
        for c in &path {
            let (dx, dy) = (c.x - origin.x, c.y - origin.y);
            extent = extent.max(dx.abs()).max(dy.abs());
            let v = [dx as f32, dy as f32];
            // A zero-length edge (repeated vertex, or two vertices rounded together) never
            // crosses a ray and would force the exact path: drop it.
            if verts.last() != Some(&v) {
                verts.push(v);
            }
        }
        // Degenerate after rounding (fewer than 3 distinct vertices and the closing one): not
        // worth a special case, the grid handles it.
        if verts.len() < 4 {
            return None;
        }
        // ε: f32 half-ulp of the offsets (≤ extent · 2⁻²⁴) for each vertex, plus the f64
        // subtractions of vertex and point from the origin (|x| ≤ 540: ulp ≤ 1.2e-13), generous.
        let eps = extent * (1.0 / (1u64 << 24) as f64) + 1e-12;
        let margin = 4.0 * (eps + eps);
        let at = self.pool.len() as u32;
        self.pool.push([ox, oy]);
        self.pool.push([next_up(margin as f32), f32::from_bits(verts.len() as u32)]);
        self.pool.extend_from_slice(&verts);
        Some(at)
    }

    /// [`Polygon::contains`] for the polygon stored at `at`, or `None` when the point is too
    /// close to an edge for the rounded test to decide (the caller then takes the exact path).
    #[inline]
    pub(crate) fn contains(&self, at: u32, p: LatLon) -> Option<bool> {
        let at = at as usize;
        let [ox, oy] = self.pool[at];
        let [m, n] = self.pool[at + 1];
        let verts = &self.pool[at + 2..at + 2 + n.to_bits() as usize];
        let (ox, oy, m) = (ox as f64, oy as f64, m as f64);
        // The one shift (as `Polygon::contains` adds it) that can bring the point into the
        // polygon's frame: the polygon is narrower than 170°, so at most one lands within it.
        let mut x = p.lon;
        let d = x - ox;
        if d > 180.0 {
            x += -360.0;
        } else if d < -180.0 {
            x += 360.0;
        }
        let (qx, qy) = (x - ox, p.lat - oy);
        // Branch-free over the edges (their outcomes are unpredictable): the parity, and whether
        // any edge comes within the margin.
        let (mut inside, mut near) = (false, false);
        let [a0, a1] = verts[0];
        let (mut ax, mut ay) = (a0 as f64 - qx, a1 as f64 - qy);
        for &[b0, b1] in &verts[1..] {
            let (bx, by) = (b0 as f64 - qx, b1 as f64 - qy);
            // Twice the signed area of (point, a, b): distance to the edge's line times |b − a|.
            let c = ax * by - bx * ay;
            let tol = m * ((bx - ax).abs() + (by - ay).abs()) + 1e-15 * ((ax * by).abs() + (bx * ay).abs());
            // Both ends more than the margin above (or below) the point: no crossing, and the
            // point is farther than the margin from the edge. Otherwise `|c| ≤ tol` means the
            // point may be within the margin of the edge's line.
            let far = (ay > m) & (by > m) | (ay < -m) & (by < -m);
            near |= !far & (c.abs() <= tol);
            // Half-open rule on y; the edge crosses the ray to +x iff the point is on its left
            // going up (the signs of the differences are exact).
            inside ^= ((ay > 0.0) != (by > 0.0)) & ((c > 0.0) == (by > 0.0));
            (ax, ay) = (bx, by);
        }
        if near {
            None
        } else {
            Some(inside)
        }
    }

    /// Releases spare capacity once every polygon is in.
    pub(crate) fn shrink_to_fit(&mut self) {
        self.pool.shrink_to_fit();
    }

    /// Heap bytes held by the store.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.pool.capacity() * std::mem::size_of::<[f32; 2]>()
    }
}

/// The next `f32` above a positive finite `x`.
fn next_up(x: f32) -> f32 {
    f32::from_bits(x.to_bits() + 1)
}

/// A cell the boundary passes through.
#[derive(Debug, Clone)]
struct BoundaryCell {
    /// Range of this cell's edges in [`PolyGrid::edges`].
    start: u32,
    /// End of the range (exclusive).
    end: u32,
    /// Centre of the cell, the reference point whose status is known.
    center: Coord<f64>,
    /// Whether the centre is inside (or on the boundary of) the polygon.
    center_inside: bool,
    /// The centre lies exactly on the boundary: every point of this cell takes the exact path.
    always_exact: bool,
}

/// One edge, with its bounding box for a cheap reject before the orientation tests.
#[derive(Debug, Clone, Copy)]
struct Edge {
    a: Coord<f64>,
    b: Coord<f64>,
    min: Coord<f64>,
    max: Coord<f64>,
}

/// Per-polygon acceleration grid; answers exactly what [`Polygon::contains`] answers.
#[derive(Debug, Clone)]
pub(crate) struct PolyGrid {
    /// Outer-ring bounding box in the unwrapped frame: `[min_lon, min_lat, max_lon, max_lat]`.
    bbox: [f64; 4],
    /// Cells per degree along x and y.
    sx: f64,
    sy: f64,
    nx: u32,
    ny: u32,
    /// Per cell (row-major): [`INSIDE`], [`OUTSIDE`] or an index into `boundary`.
    cells: Vec<u32>,
    boundary: Vec<BoundaryCell>,
    edges: Vec<Edge>,
}

impl PolyGrid {
    /// Rasterises `poly`; cost O(edges · cells touched + boundary cells · edges).
    pub(crate) fn build(poly: &Polygon) -> Self {
        let shape = poly.unwrapped();
        let bbox = poly.bbox();
        let all_edges: Vec<Edge> = std::iter::once(shape.exterior())
            .chain(shape.interiors())
            .flat_map(|ring| ring.lines())
            .map(|l| Edge {
                a: l.start,
                b: l.end,
                min: Coord { x: l.start.x.min(l.end.x), y: l.start.y.min(l.end.y) },
                max: Coord { x: l.start.x.max(l.end.x), y: l.start.y.max(l.end.y) },
            })
            .collect();
        let width = (bbox[2] - bbox[0]).max(1e-9);
        let height = (bbox[3] - bbox[1]).max(1e-9);
        let target = (all_edges.len() * CELLS_PER_EDGE).clamp(1, MAX_CELLS) as f64;
        let nx = (target * width / height).sqrt().ceil().clamp(1.0, 4096.0) as u32;
        let ny = (target / nx as f64).ceil().clamp(1.0, 4096.0) as u32;
        let (sx, sy) = (nx as f64 / width, ny as f64 / height);
        let (cw, ch) = (width / nx as f64, height / ny as f64);
        // Conservative slack: far above the rounding of coordinates (|x| ≤ 540, ulp ~1e-13) so a
        // point assigned to a cell by rounding is still covered by that cell's edge list.
        let (ex, ey) = (cw * 1e-6 + 1e-9, ch * 1e-6 + 1e-9);

        // Which edges touch which cell: per column of the edge's x-range, the y-range the edge
        // spans within that column (a tighter cover than the edge's bounding box).
        let mut pairs: Vec<(u32, u32)> = Vec::new();
        for (k, e) in all_edges.iter().enumerate() {
            let i0 = col(e.min.x - ex, bbox[0], sx, nx);
            let i1 = col(e.max.x + ex, bbox[0], sx, nx);
            for i in i0..=i1 {
                let xa = (bbox[0] + i as f64 * cw).max(e.min.x);
                let xb = (bbox[0] + (i + 1) as f64 * cw).min(e.max.x);
                let (ya, yb) = if e.b.x != e.a.x && xa <= xb {
                    let at = |x: f64| e.a.y + (e.b.y - e.a.y) * ((x - e.a.x) / (e.b.x - e.a.x));
                    let (y1, y2) = (at(xa), at(xb));
                    (y1.min(y2).max(e.min.y), y1.max(y2).min(e.max.y))
                } else {
                    (e.min.y, e.max.y)
                };
                let j0 = col(ya - ey, bbox[1], sy, ny);
                let j1 = col(yb + ey, bbox[1], sy, ny);
                for j in j0..=j1 {
                    pairs.push((j * nx + i, k as u32));
                }
            }
        }
        pairs.sort_unstable();
        pairs.dedup();

        let n_cells = nx as usize * ny as usize;
        let mut cells = vec![OUTSIDE; n_cells];
        let mut boundary = Vec::new();
        let mut edges = Vec::with_capacity(pairs.len());
        let center_of = |cell: usize| {
            let (i, j) = (cell % nx as usize, cell / nx as usize);
            Coord { x: bbox[0] + (i as f64 + 0.5) * cw, y: bbox[1] + (j as f64 + 0.5) * ch }
        };
        let mut p = 0;
        while p < pairs.len() {
            let cell = pairs[p].0 as usize;
            let start = edges.len() as u32;
            while p < pairs.len() && pairs[p].0 as usize == cell {
                edges.push(all_edges[pairs[p].1 as usize]);
                p += 1;
            }
            let center = center_of(cell);
            let pos = shape.coordinate_position(&center);
            cells[cell] = boundary.len() as u32;
            boundary.push(BoundaryCell {
                start,
                end: edges.len() as u32,
                center,
                center_inside: pos != CoordPos::Outside,
                always_exact: pos == CoordPos::OnBoundary,
            });
        }
        // Cells no edge touches: adjacent ones in a row share a status (nothing separates them),
        // so the exact test runs once per run of such cells.
        for j in 0..ny as usize {
            let mut run_status: Option<u32> = None;
            for i in 0..nx as usize {
                let cell = j * nx as usize + i;
                if cells[cell] < OUTSIDE {
                    run_status = None;
                    continue;
                }
                let status = *run_status.get_or_insert_with(|| {
                    if shape.coordinate_position(&center_of(cell)) == CoordPos::Outside {
                        OUTSIDE
                    } else {
                        INSIDE
                    }
                });
                cells[cell] = status;
            }
        }
        Self { bbox, sx, sy, nx, ny, cells, boundary, edges }
    }

    /// API.md rule 1 for `poly` (the polygon this grid was built from): the same answer as
    /// [`Polygon::contains`], including its three longitude shifts.
    /// `poly` yields the polygon for the rare exact fallback (fetched only then: it is a few
    /// cache misses away).
    pub(crate) fn contains<'a>(&self, p: LatLon, poly: impl Fn() -> Option<&'a Polygon> + Copy) -> bool {
        let [min_lon, min_lat, max_lon, max_lat] = self.bbox;
        if p.lat < min_lat || p.lat > max_lat {
            return false;
        }
        [0.0, 360.0, -360.0].into_iter().any(|shift| {
            let x = p.lon + shift;
            x >= min_lon && x <= max_lon && self.position(poly, Coord { x, y: p.lat })
        })
    }

    /// Inside or on the boundary, for a point already within the bounding box.
    fn position<'a>(&self, poly: impl Fn() -> Option<&'a Polygon>, p: Coord<f64>) -> bool {
        let i = col(p.x, self.bbox[0], self.sx, self.nx);
        let j = col(p.y, self.bbox[1], self.sy, self.ny);
        let cell = self.cells[(j * self.nx + i) as usize];
        match cell {
            INSIDE => true,
            OUTSIDE => false,
            k => {
                let b = &self.boundary[k as usize];
                let exact = || poly().is_some_and(|g| g.unwrapped().coordinate_position(&p) != CoordPos::Outside);
                if b.always_exact {
                    return exact();
                }
                let c = b.center;
                let (smin, smax) =
                    (Coord { x: c.x.min(p.x), y: c.y.min(p.y) }, Coord { x: c.x.max(p.x), y: c.y.max(p.y) });
                let mut inside = b.center_inside;
                for e in &self.edges[b.start as usize..b.end as usize] {
                    if e.max.x < smin.x || e.min.x > smax.x || e.max.y < smin.y || e.min.y > smax.y {
                        continue;
                    }
                    let o1 = RobustKernel::orient2d(e.a, e.b, c);
                    let o2 = RobustKernel::orient2d(e.a, e.b, p);
                    if o1 == Orientation::Collinear || o2 == Orientation::Collinear {
                        return exact();
                    }
                    if o1 == o2 {
                        continue;
                    }
                    let o3 = RobustKernel::orient2d(c, p, e.a);
                    let o4 = RobustKernel::orient2d(c, p, e.b);
                    if o3 == Orientation::Collinear || o4 == Orientation::Collinear {
                        return exact();
                    }
                    if o3 != o4 {
                        inside = !inside;
                    }
                }
                inside
            }
        }
    }

    /// Heap bytes held by this grid.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.cells.capacity() * 4
            + self.boundary.capacity() * std::mem::size_of::<BoundaryCell>()
            + self.edges.capacity() * std::mem::size_of::<Edge>()
    }
}

/// Column (or row) of coordinate `v` in a grid starting at `origin` with `scale` cells per unit,
/// clamped into `0..n` (points on the far edge of the box belong to the last cell).
#[inline]
fn col(v: f64, origin: f64, scale: f64, n: u32) -> u32 {
    let f = ((v - origin) * scale).floor();
    if f <= 0.0 {
        0
    } else if f >= (n - 1) as f64 {
        n - 1
    } else {
        f as u32
    }
}
