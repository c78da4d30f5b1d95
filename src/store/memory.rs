//! The in-memory store: the embedded default for a single node.
