//! [`FenceIndex`]: an immutable multi-level lat/lon cell grid over every fence of a set of
//! campaigns, answering exactly what a brute force over [`Shape::contains`] answers.
//!
//! Layout. Each level is a grid of `2^k` cells per degree (k = 7, 4, 1: cells of ~870 m, ~7 km,
//! ~55 km of latitude). A fence goes to the finest level where its bounding box covers at most
//! [`MAX_CELLS_PER_FENCE`] cells, and gets one entry in each of those cells; fences that cover
//! more even at the coarsest level (a 50 km circle at the pole, a polygon wider than 180°) go to
//! a short list scanned with a bounding-box pre-check. Cells are grouped in tiles of 8 × 8; only
//! tiles some fence touches exist (a hash map from tile key to tile), so fences spread over the
//! world never allocate a world-sized array. A tile's cells are ranges of one dense entry array.
//!
//! Circle entries (24 bytes, the hit inline). A circle entry holds its centre as a unit vector *relative to the tile's
//! centre* in `f32` (small numbers, so `f32` keeps ~1 mm), and its threshold on the squared chord,
//! `4 sin²(r / 2R)`. Since `haversine ≤ r ⇔ chord² ≤ 4 sin²(r / 2R)`, the test is a 3-D
//! difference and a dot product. Its rounding error is bounded ([`Level::band_abs`],
//! [`BAND_REL`]); a ping within that band of the circle takes the exact path through
//! [`Shape::contains`], so answers equal the brute force bit for bit. The candidate loop is
//! branch-free on the test's outcome; [`FenceIndex::matches_many`] overlaps the cache misses of 16
//! pings.
//!
//! Polygons have their own entries (28 bytes) after a cell's circles: the polygon's bounding box
//! relative to the tile's centre in `f32` (widened by a per-level margin), so most candidates are
//! rejected without touching the polygon, then either a compact crossing-number test
//! ([`SmallPolys`], ≤ 256 edges, exact fallback near an edge) or the polygon's [`PolyGrid`].

use std::sync::Arc;

use rustc_hash::FxHashMap;

use super::polygon::{PolyGrid, SmallPolys};
use super::Hit;
use crate::domain::geo::{LatLon, Shape, EARTH_RADIUS_M};
use crate::domain::Campaign;

/// log2 of cells per degree of each level, finest first.
const LEVEL_SHIFTS: [u32; 3] = [7, 4, 1];
/// Cells per tile side.
const TILE: u64 = 8;
/// Most cells one fence may occupy at a level before it moves to a coarser one.
pub(crate) const MAX_CELLS_PER_FENCE: u64 = 64;
/// Relative error band of the `f32` chord test, on the threshold (see [`Level::band_abs`]).
/// The rounding analysis gives ≲ 8·10⁻⁷; this is ten times that.
const BAND_REL: f32 = 8e-6;
/// Slack added to every cover, degrees: far above rounding of `floor(deg · 2^k)` (~1e-13°).
const COVER_SLACK_DEG: f64 = 1e-9;

/// One circle in one cell: 24 bytes, read sequentially for every ping in the cell. The hit is
/// inline so a match costs no further cache miss.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Centre unit vector minus the tile's reference vector.
    c: [f32; 3],
    /// `4 sin²(r / 2R)`, the squared chord of the radius.
    t: f32,
    /// The fence.
    hit: Hit,
}

/// One polygon in one cell: 28 bytes.
#[derive(Debug, Clone, Copy)]
struct PolyEntry {
    /// Bounding box relative to the tile's centre, degrees, `[lon0, lat0, lon1, lat1]` (longitudes
    /// in the frame nearest the tile); the ping's offsets are compared with it widened by the
    /// level's [`Level::poly_margin`].
    b: [f32; 4],
    /// The fence.
    hit: Hit,
    /// [`BIG`] set: index into [`FenceIndex::polys`]; else the polygon's position in
    /// [`FenceIndex::small`].
    at: u32,
}

/// Flag of [`PolyEntry::at`]: the polygon has a [`PolyGrid`].
const BIG: u32 = 1 << 31;

/// One grid level.
#[derive(Debug, Default)]
struct Level {
    /// Cells per degree.
    scale: f64,
    /// Cells around a parallel (`360 · scale`) and from pole to pole (`180 · scale`).
    n_lon: u64,
    n_lat: u64,
    /// Tile key (`tile_lat << 32 | tile_lon`) → tile number.
    tiles: FxHashMap<u64, u32>,
    /// Per tile: its centre, the origin the entries' `f32` offsets are taken from.
    refs: Vec<TileRef>,
    /// Per tile, per cell (`tile · 64 + row · 8 + col`): start of the cell's circle entries and,
    /// if the level has polygons ([`Level::stride`] 2), of its polygon entries; one extra
    /// trailing value (pair) closes the last cell.
    offsets: Vec<u32>,
    /// Values per cell in `offsets`: 1 (circles only, the layout stays as small as before
    /// polygons had entries of their own) or 2.
    stride: usize,
    entries: Vec<Entry>,
    poly_entries: Vec<PolyEntry>,
    /// Widening of polygon bounding boxes (degrees): far above the `f32` rounding of offsets
    /// within a fence's cover at this level.
    poly_margin: f32,
    /// Absolute error band of the chord test at this level, `1e-6 · h²` with `h` a bound on the
    /// distance (radians) of any point of a tile from its reference: covers `f32` rounding of
    /// the offsets, whose size is bounded by the tile.
    band_abs: f32,
}

/// Where one fence goes.
#[derive(Debug, Clone, Copy)]
enum Placement {
    /// Level `level`, cells `lat0..=lat1` × `lon0..lon0 + nlon` (longitude wraps).
    Grid { level: u8, lat0: u64, lat1: u64, lon0: i64, nlon: u64 },
    /// Too big for any level: the scanned list.
    Global,
}

/// A fence in the scanned list, with a latitude pre-check.
#[derive(Debug, Clone, Copy)]
struct GlobalFence {
    hit: Hit,
    min_lat: f64,
    max_lat: f64,
}

/// Immutable snapshot: the campaigns it was built from and the index over all their fences.
#[derive(Debug)]
pub struct FenceIndex {
    campaigns: Vec<Arc<Campaign>>,
    /// Fences indexed.
    fence_count: usize,
    levels: Vec<Level>,
    global: Vec<GlobalFence>,
    /// Grids of the polygons too big for [`SmallPolys`]; a [`BIG`] polygon entry names one.
    polys: Vec<(Hit, PolyGrid)>,
    /// The small polygons.
    small: SmallPolys,
}

impl Level {
    fn new(shift: u32) -> Self {
        let scale = (1u64 << shift) as f64;
        let tile_deg = TILE as f64 / scale;
        let h = (2.0 * tile_deg).to_radians();
        Self {
            scale,
            n_lon: 360 << shift,
            n_lat: 180 << shift,
            band_abs: (1e-6 * h * h) as f32,
            // The cover spans ≤ 64 cells (8 tiles): offsets below 9 tiles, f32 ulp ≤ 2⁻²⁰ · tile.
            poly_margin: (tile_deg * 1e-4) as f32,
            offsets: vec![0],
            stride: 1,
            ..Self::default()
        }
    }

    #[inline]
    fn lat_cell(&self, lat: f64) -> u64 {
        let f = ((lat + 90.0) * self.scale).floor();
        if f <= 0.0 {
            0
        } else {
            (f as u64).min(self.n_lat - 1)
        }
    }

    #[inline]
    fn lon_cell(&self, lon: f64) -> i64 {
        ((lon + 180.0) * self.scale).floor() as i64
    }

    #[inline]
    fn key(lat_cell: u64, lon_cell: u64) -> (u64, usize) {
        let key = (lat_cell / TILE) << 32 | (lon_cell / TILE);
        let local = (lat_cell % TILE) * TILE + lon_cell % TILE;
        (key, local as usize)
    }

    /// Tile number for a key, creating the tile (and its reference vector) if needed.
    fn tile_for(&mut self, key: u64, counts: &mut Vec<[u32; 2]>) -> usize {
        let next = self.refs.len() as u32;
        let t = *self.tiles.entry(key).or_insert(next) as usize;
        if t == self.refs.len() {
            let (tlat, tlon) = ((key >> 32) as f64, (key & 0xffff_ffff) as f64);
            let tile_deg = TILE as f64 / self.scale;
            let lat = -90.0 + (tlat + 0.5) * tile_deg;
            let lon = -180.0 + (tlon + 0.5) * tile_deg;
            let (sin_lat, cos_lat) = lat.to_radians().sin_cos();
            let (sin_lon, cos_lon) = lon.to_radians().sin_cos();
            self.refs.push(TileRef { lat, lon, sin_lat, cos_lat, sin_lon, cos_lon });
            counts.resize(counts.len() + (TILE * TILE) as usize, [0, 0]);
        }
        t
    }

    /// Calls `f(key, local)` for every cell of a placement, each cell once.
    fn for_each_cell(&self, lat0: u64, lat1: u64, lon0: i64, nlon: u64, mut f: impl FnMut(u64, usize)) {
        for la in lat0..=lat1 {
            for k in 0..nlon {
                let lo = (lon0 + k as i64).rem_euclid(self.n_lon as i64) as u64;
                let (key, local) = Self::key(la, lo);
                f(key, local);
            }
        }
    }

    /// Finds the ping's cell: its entry range and the ping relative to the tile's reference.
    #[inline]
    fn probe(&self, p: LatLon) -> Probe {
        let la = self.lat_cell(p.lat);
        let lo = self.lon_cell(p.lon).rem_euclid(self.n_lon as i64) as u64;
        let (key, local) = Self::key(la, lo);
        let Some(&tile) = self.tiles.get(&key) else { return Probe::EMPTY };
        let cell = tile as usize * (TILE * TILE) as usize + local;
        let s = self.stride;
        let (start, end) = (self.offsets[cell * s], self.offsets[cell * s + s]);
        let (pstart, pend) = if s == 2 { (self.offsets[cell * 2 + 1], self.offsets[cell * 2 + 3]) } else { (0, 0) };
        if start == end && pstart == pend {
            return Probe::EMPTY;
        }
        let t = &self.refs[tile as usize];
        // The unit vector only for a cell with circles (cells of only polygons are common).
        let q = if start == end {
            [0.0; 3]
        } else {
            let (v, r) = (t.unit_near(p.lat, p.lon), t.unit());
            [(v[0] - r[0]) as f32, (v[1] - r[1]) as f32, (v[2] - r[2]) as f32]
        };
        let m = self.poly_margin;
        let (dlat, dlon) = ((p.lat - t.lat) as f32, wrap_deg(p.lon - t.lon) as f32);
        Probe { start, end, pstart, pend, q, lo: [dlon - m, dlat - m], hi: [dlon + m, dlat + m] }
    }

    /// Appends the fences of the probed cell that contain the ping.
    #[inline]
    fn scan(&self, index: &FenceIndex, p: LatLon, probe: &Probe, out: &mut Vec<Hit>) {
        let q = probe.q;
        let entries = &self.entries[probe.start as usize..probe.end as usize];
        // Write every candidate and advance only past the matching ones: no branch on the
        // (unpredictable) outcome of the test, only on the rare undecided case.
        let base = out.len();
        out.resize(base + entries.len(), Hit { campaign: 0, fence: 0 });
        let mut w = base;
        for e in entries {
            let (dx, dy, dz) = (q[0] - e.c[0], q[1] - e.c[1], q[2] - e.c[2]);
            let d = dx * dx + dy * dy + dz * dz - e.t;
            let band = self.band_abs + BAND_REL * e.t;
            let mut inside = d < -band;
            // `|d| ≤ band`: within the error band of the boundary (rare): decide exactly.
            #[allow(clippy::neg_cmp_op_on_partial_ord)]
            if !(d.abs() > band) {
                inside = index.shape(e.hit).contains(p);
            }
            out[w] = e.hit;
            w += inside as usize;
        }
        out.truncate(w);
        // Polygons: first the bounding boxes, branch-free (most reject), then the candidates.
        let (lo, hi) = (probe.lo, probe.hi);
        let mut cand = [0u8; 32];
        for chunk in self.poly_entries[probe.pstart as usize..probe.pend as usize].chunks(32) {
            let mut k = 0;
            for (i, e) in chunk.iter().enumerate() {
                cand[k] = i as u8;
                k += ((e.b[0] <= hi[0]) & (e.b[2] >= lo[0]) & (e.b[1] <= hi[1]) & (e.b[3] >= lo[1])) as usize;
            }
            for &i in &cand[..k] {
                let e = &chunk[i as usize];
                if index.poly_contains(e, p) {
                    out.push(e.hit);
                }
            }
        }
    }

    fn heap_bytes(&self) -> usize {
        // hashbrown: one control byte per bucket plus the (key, value) pair.
        self.tiles.capacity() * (std::mem::size_of::<(u64, u32)>() + 1)
            + self.refs.capacity() * std::mem::size_of::<TileRef>()
            + self.offsets.capacity() * 4
            + self.entries.capacity() * std::mem::size_of::<Entry>()
            + self.poly_entries.capacity() * std::mem::size_of::<PolyEntry>()
    }
}

/// A ping's cell at one level, found before its entries are read (so a batch can overlap the
/// memory latency of many pings).
#[derive(Debug, Clone, Copy)]
struct Probe {
    /// The cell's circle entries.
    start: u32,
    end: u32,
    /// The cell's polygon entries.
    pstart: u32,
    pend: u32,
    /// Circles: the ping's unit vector minus the tile's.
    q: [f32; 3],
    /// Polygons: the ping's `[lon, lat]` offsets from the tile's centre, minus and plus the
    /// level's margin.
    lo: [f32; 2],
    hi: [f32; 2],
}

impl Probe {
    const EMPTY: Probe = Probe { start: 0, end: 0, pstart: 0, pend: 0, q: [0.0; 3], lo: [0.0; 2], hi: [0.0; 2] };
}

/// A longitude difference brought into −180..=180.
#[inline]
fn wrap_deg(d: f64) -> f64 {
    if d > 180.0 {
        d - 360.0
    } else if d < -180.0 {
        d + 360.0
    } else {
        d
    }
}

/// Centre of a tile and its sines and cosines: the ping's unit vector is then the centre's
/// rotated by small angles, a few multiplications instead of four calls to `sin`/`cos`.
#[derive(Debug, Clone, Copy)]
struct TileRef {
    lat: f64,
    lon: f64,
    sin_lat: f64,
    cos_lat: f64,
    sin_lon: f64,
    cos_lon: f64,
}

impl TileRef {
    /// Unit vector of the centre (the same operations at build and query, so bit-identical).
    #[inline]
    fn unit(&self) -> [f64; 3] {
        [self.cos_lat * self.cos_lon, self.cos_lat * self.sin_lon, self.sin_lat]
    }

    /// Unit vector of a point of this tile, by the angle-sum formulas with the small angles'
    /// sines and cosines from their Taylor series. Offsets are at most half a tile (≤ 2° at the
    /// coarsest level, 0.035 rad), where the truncation error is below 1e-18: far inside the error
    /// band of the `f32` test.
    #[inline]
    fn unit_near(&self, lat: f64, lon: f64) -> [f64; 3] {
        let mut dlon = lon - self.lon;
        if dlon > 180.0 {
            dlon -= 360.0;
        } else if dlon < -180.0 {
            dlon += 360.0;
        }
        let (s1, c1) = small_sin_cos((lat - self.lat).to_radians());
        let (s2, c2) = small_sin_cos(dlon.to_radians());
        let sin_lat = self.sin_lat * c1 + self.cos_lat * s1;
        let cos_lat = self.cos_lat * c1 - self.sin_lat * s1;
        let sin_lon = self.sin_lon * c2 + self.cos_lon * s2;
        let cos_lon = self.cos_lon * c2 - self.sin_lon * s2;
        [cos_lat * cos_lon, cos_lat * sin_lon, sin_lat]
    }
}

/// `(sin x, cos x)` for |x| ≤ 0.04 by Taylor series (sin to x⁷, cos to x⁸; error < 1e-18).
#[inline]
fn small_sin_cos(x: f64) -> (f64, f64) {
    let x2 = x * x;
    let s = x * (1.0 - x2 / 6.0 * (1.0 - x2 / 20.0 * (1.0 - x2 / 42.0)));
    let c = 1.0 - x2 / 2.0 * (1.0 - x2 / 12.0 * (1.0 - x2 / 30.0 * (1.0 - x2 / 56.0)));
    (s, c)
}

/// Unit vector of a position given in degrees.
#[inline]
fn unit(lat: f64, lon: f64) -> [f64; 3] {
    let (sl, cl) = lat.to_radians().sin_cos();
    let (so, co) = lon.to_radians().sin_cos();
    [cl * co, cl * so, sl]
}

/// Bounding box of a fence in degrees: `(min_lat, max_lat, min_lon, max_lon)`, longitudes possibly
/// outside ±180 (to be wrapped), `None` for the longitude when it spans every meridian.
fn fence_bounds(shape: &Shape) -> (f64, f64, Option<(f64, f64)>) {
    match shape {
        Shape::Circle(c) => {
            // Angular radius, enlarged by far more than any rounding so the cover is conservative.
            let theta = c.radius_m / EARTH_RADIUS_M * (1.0 + 1e-9) + 1e-12;
            let dlat = theta.to_degrees();
            let (lat0, lat1) = (c.center.lat - dlat, c.center.lat + dlat);
            if lat1 >= 90.0 || lat0 <= -90.0 {
                return (lat0.max(-90.0), lat1.min(90.0), None);
            }
            // Widest longitude of a spherical cap: asin(sin θ / cos φ).
            let s = theta.sin() / c.center.lat.to_radians().cos();
            if s >= 1.0 {
                return (lat0, lat1, None);
            }
            let dlon = s.asin().to_degrees() * (1.0 + 1e-9);
            (lat0, lat1, Some((c.center.lon - dlon, c.center.lon + dlon)))
        }
        Shape::Polygon(p) => {
            let [x0, y0, x1, y1] = p.bbox();
            if x1 - x0 >= 180.0 {
                return (y0, y1, None);
            }
            (y0, y1, Some((x0, x1)))
        }
    }
}

impl FenceIndex {
    /// Builds the index over every fence of `campaigns`; hit slots index this vector.
    pub fn build(campaigns: Vec<Arc<Campaign>>) -> Self {
        let mut levels: Vec<Level> = LEVEL_SHIFTS.iter().map(|&s| Level::new(s)).collect();
        let mut fences = Vec::new();
        let mut placements = Vec::new();
        let mut global = Vec::new();
        let mut polys = Vec::new();
        let mut small = SmallPolys::default();
        for (ci, campaign) in campaigns.iter().enumerate() {
            for (fi, fence) in campaign.fences.iter().enumerate() {
                let slot = fences.len() as u32;
                fences.push(Hit { campaign: ci as u32, fence: fi as u32 });
                let placement = place(&levels, &fence.shape);
                if let Placement::Global = placement {
                    let (min_lat, max_lat, _) = fence_bounds(&fence.shape);
                    global.push(GlobalFence { hit: fences[slot as usize], min_lat, max_lat });
                }
                placements.push(placement);
            }
        }
        // Pass 1: create tiles and count entries per cell ([circles, polygons]).
        let mut counts: Vec<Vec<[u32; 2]>> = vec![Vec::new(); levels.len()];
        let mut slot = 0usize;
        for campaign in &campaigns {
            for fence in &campaign.fences {
                let kind = matches!(fence.shape, Shape::Polygon(_)) as usize;
                if let Placement::Grid { level, lat0, lat1, lon0, nlon } = placements[slot] {
                    let (lv, cnt) = (&mut levels[level as usize], &mut counts[level as usize]);
                    let mut cells = Vec::new();
                    lv.for_each_cell(lat0, lat1, lon0, nlon, |key, local| cells.push((key, local)));
                    for (key, local) in cells {
                        let t = lv.tile_for(key, cnt);
                        cnt[t * (TILE * TILE) as usize + local][kind] += 1;
                    }
                }
                slot += 1;
            }
        }
        // Prefix sums: starts[c] = first circle and first polygon entry of cell c.
        let mut cursors: Vec<Vec<[u32; 2]>> = Vec::with_capacity(levels.len());
        for (lv, cnt) in levels.iter_mut().zip(&counts) {
            let mut starts = Vec::with_capacity(cnt.len() + 1);
            let mut acc = [0u32; 2];
            for &[nc, np] in cnt {
                starts.push(acc);
                acc = [acc[0] + nc, acc[1] + np];
            }
            starts.push(acc);
            lv.stride = if acc[1] > 0 { 2 } else { 1 };
            let mut offsets = Vec::with_capacity(starts.len() * lv.stride);
            offsets.extend(starts.iter().flat_map(|pair| pair[..lv.stride].iter().copied()));
            lv.offsets = offsets;
            cursors.push(starts);
            lv.entries = vec![Entry { c: [0.0; 3], t: f32::NAN, hit: Hit { campaign: 0, fence: 0 } }; acc[0] as usize];
            lv.poly_entries =
                vec![PolyEntry { b: [0.0; 4], hit: Hit { campaign: 0, fence: 0 }, at: 0 }; acc[1] as usize];
        }
        // Pass 2: fill the entries.
        let mut slot = 0usize;
        for campaign in &campaigns {
            for fence in &campaign.fences {
                let pl = placements[slot];
                let hit = fences[slot];
                slot += 1;
                let Placement::Grid { level, lat0, lat1, lon0, nlon } = pl else { continue };
                let lv = &mut levels[level as usize];
                let cur = &mut cursors[level as usize];
                let mut cells = Vec::new();
                lv.for_each_cell(lat0, lat1, lon0, nlon, |key, local| cells.push((key, local)));
                match &fence.shape {
                    Shape::Circle(c) => {
                        let cv = unit(c.center.lat, c.center.lon);
                        let half = c.radius_m / EARTH_RADIUS_M * 0.5;
                        let t2 = (4.0 * half.sin() * half.sin()) as f32;
                        for (key, local) in cells {
                            let t = lv.tiles[&key] as usize;
                            let at = &mut cur[t * (TILE * TILE) as usize + local][0];
                            let r = lv.refs[t].unit();
                            lv.entries[*at as usize] = Entry {
                                c: [(cv[0] - r[0]) as f32, (cv[1] - r[1]) as f32, (cv[2] - r[2]) as f32],
                                t: t2,
                                hit,
                            };
                            *at += 1;
                        }
                    }
                    Shape::Polygon(p) => {
                        let at = match small.push(p) {
                            Some(at) => at,
                            None => {
                                polys.push((hit, PolyGrid::build(p)));
                                BIG | (polys.len() as u32 - 1)
                            }
                        };
                        let [x0, y0, x1, y1] = p.bbox();
                        for (key, local) in cells {
                            let t = lv.tiles[&key] as usize;
                            let pos = &mut cur[t * (TILE * TILE) as usize + local][1];
                            let r = &lv.refs[t];
                            // The bounding box in the 360° frame nearest the tile's centre (a ping
                            // in this cell is compared in that frame too).
                            let shift = ((0.5 * (x0 + x1) - r.lon) / 360.0).round() * 360.0;
                            let b = [x0 - shift - r.lon, y0 - r.lat, x1 - shift - r.lon, y1 - r.lat];
                            lv.poly_entries[*pos as usize] =
                                PolyEntry { b: [b[0] as f32, b[1] as f32, b[2] as f32, b[3] as f32], hit, at };
                            *pos += 1;
                        }
                    }
                }
            }
        }
        levels.retain(|lv| !lv.entries.is_empty() || !lv.poly_entries.is_empty());
        small.shrink_to_fit();
        polys.shrink_to_fit();
        Self { campaigns, fence_count: fences.len(), levels, global, polys, small }
    }

    /// The campaigns this index was built from, in hit-slot order.
    pub fn campaigns(&self) -> &[Arc<Campaign>] {
        &self.campaigns
    }

    /// The campaign behind a hit's `campaign` slot.
    pub fn campaign(&self, slot: u32) -> &Arc<Campaign> {
        &self.campaigns[slot as usize]
    }

    /// Appends every fence containing `p` (API.md rule 1), each once, in any order.
    pub fn matches(&self, p: LatLon, out: &mut Vec<Hit>) {
        if self.levels.is_empty() && self.global.is_empty() {
            return;
        }
        for lv in &self.levels {
            let probe = lv.probe(p);
            lv.scan(self, p, &probe, out);
        }
        self.scan_global(p, out);
    }

    /// Matches many pings: afterwards the hits of `pings[i]` are `out[ends[i - 1]..ends[i]]`
    /// (`ends` and `out` are appended to; `ends[i - 1]` reads as `out`'s length on entry for
    /// `i = 0`). Same answers as [`FenceIndex::matches`], faster: the cells of a group of pings
    /// are looked up, then their first entries touched, before any is scanned, so the cache
    /// misses of the group overlap instead of following one another.
    pub fn matches_many(&self, pings: &[LatLon], out: &mut Vec<Hit>, ends: &mut Vec<usize>) {
        const GROUP: usize = 16;
        let mut probes = [[Probe::EMPTY; GROUP]; LEVEL_SHIFTS.len()];
        for group in pings.chunks(GROUP) {
            for (lv, probes) in self.levels.iter().zip(probes.iter_mut()) {
                for (probe, &p) in probes.iter_mut().zip(group) {
                    *probe = lv.probe(p);
                }
            }
            // Touch each cell's first entry: independent loads the CPU issues together.
            let mut touched = 0.0f32;
            for (lv, probes) in self.levels.iter().zip(probes.iter()) {
                for probe in &probes[..group.len()] {
                    if let Some(e) = lv.entries.get(probe.start as usize) {
                        touched += e.t;
                    }
                    if let Some(e) = lv.poly_entries.get(probe.pstart as usize) {
                        touched += e.b[0];
                    }
                }
            }
            std::hint::black_box(touched);
            for (i, &p) in group.iter().enumerate() {
                for (lv, probes) in self.levels.iter().zip(probes.iter()) {
                    lv.scan(self, p, &probes[i], out);
                }
                self.scan_global(p, out);
                ends.push(out.len());
            }
        }
    }

    fn scan_global(&self, p: LatLon, out: &mut Vec<Hit>) {
        for g in &self.global {
            if p.lat >= g.min_lat && p.lat <= g.max_lat && self.shape(g.hit).contains(p) {
                out.push(g.hit);
            }
        }
    }

    /// Number of fences indexed.
    pub fn fence_count(&self) -> usize {
        self.fence_count
    }

    /// Heap bytes of the index itself (not of the campaigns it shares).
    pub fn heap_bytes(&self) -> usize {
        self.campaigns.capacity() * std::mem::size_of::<Arc<Campaign>>()
            + self.levels.iter().map(Level::heap_bytes).sum::<usize>()
            + self.global.capacity() * std::mem::size_of::<GlobalFence>()
            + self.polys.iter().map(|(_, g)| g.heap_bytes()).sum::<usize>()
            + self.polys.capacity() * std::mem::size_of::<(Hit, PolyGrid)>()
            + self.small.heap_bytes()
    }

    fn shape(&self, h: Hit) -> &Shape {
        &self.campaigns[h.campaign as usize].fences[h.fence as usize].shape
    }

    /// Whether the polygon of an entry whose bounding box admitted `p` contains it, exactly.
    #[inline]
    fn poly_contains(&self, e: &PolyEntry, p: LatLon) -> bool {
        if e.at & BIG == 0 {
            if let Some(inside) = self.small.contains(e.at, p) {
                return inside;
            }
            return self.shape(e.hit).contains(p);
        }
        match self.polys.get((e.at & !BIG) as usize) {
            Some((h, grid)) if *h == e.hit => grid.contains(p, || match self.shape(e.hit) {
                Shape::Polygon(poly) => Some(poly),
                Shape::Circle(_) => None,
            }),
            _ => self.shape(e.hit).contains(p),
        }
    }
}

/// Chooses the finest level where the fence covers few enough cells.
fn place(levels: &[Level], shape: &Shape) -> Placement {
    let (lat_lo, lat_hi, lon) = fence_bounds(shape);
    let Some((lon_lo, lon_hi)) = lon else { return Placement::Global };
    for (i, lv) in levels.iter().enumerate() {
        let lat0 = lv.lat_cell(lat_lo - COVER_SLACK_DEG);
        let lat1 = lv.lat_cell(lat_hi + COVER_SLACK_DEG);
        let lon0 = lv.lon_cell(lon_lo - COVER_SLACK_DEG);
        let lon1 = lv.lon_cell(lon_hi + COVER_SLACK_DEG);
        let nlon = ((lon1 - lon0 + 1) as u64).min(lv.n_lon);
        if (lat1 - lat0 + 1) * nlon <= MAX_CELLS_PER_FENCE {
            return Placement::Grid { level: i as u8, lat0, lat1, lon0, nlon };
        }
    }
    Placement::Global
}
