//! Which fences contain a point: the hot path, pure and in memory.
//!
//! [`FenceIndex`] is an immutable multi-level cell grid over every fence of a set of campaigns
//! (see `grid.rs` for the layout); [`LiveIndex`] keeps one current [`Snapshot`] (base index +
//! small overlay of recent changes) so campaign writes show up at once while matching never
//! waits. Every answer equals a brute force over all fences with
//! [`Shape::contains`](crate::domain::Shape::contains) (API.md rule 1); the property tests in
//! `tests.rs` hold the index to that.

mod grid;
mod live;
mod polygon;
#[doc(hidden)]
pub mod testdata;
#[cfg(test)]
mod tests;

pub use grid::FenceIndex;
pub use live::{LiveIndex, Snapshot};

/// One fence containing the point: indexes into the snapshot's campaigns and that campaign's fences.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hit {
    /// Campaign slot: `snapshot.campaign(slot)`.
    pub campaign: u32,
    /// Index into that campaign's `fences`.
    pub fence: u32,
}
