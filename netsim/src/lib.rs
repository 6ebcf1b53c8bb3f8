//! netsim: partition and fault simulation of TreeScale.
//!
//! # Layout
//! - `scenario`: the TOML scenario format, checked on load.
//! - `engine`: what both modes share: the timeline, fault watching, tree
//!   checks and the report, over a `Backend` per mode.
//! - `full`: real nodes and clients on turmoil's simulated network.
//! - `protocol`: the sans-IO cores alone, for thousands of nodes.
//! - `tree`: the tree invariants both modes check.
//! - `ledger`: what applications published and received, and the
//!   subscriber rows made from it, in both modes.
//! - `report`, `svg`: what a run found, as a table, JSON and a picture.

pub mod engine;
pub mod full;
pub mod ledger;
pub mod protocol;
pub mod report;
pub mod scenario;
pub mod svg;
pub mod tree;
