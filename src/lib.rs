pub mod identity;
pub mod overlay;
pub mod tls;
pub mod topic;
pub mod wire;
