//! scap: content-addressed deploys for a fleet of MediaWiki app servers.
//!
//! The data path, one module per stage (see ARCHITECTURE.md):
//! staging -> [`build`] -> [`store`] -> (net -> host store -> release ->
//! symlink switch, in later modules).

pub mod build;
pub mod cli;
pub mod fleet;
pub mod host;
pub mod net;
pub mod progress;
pub mod store;
pub mod time;
pub mod web;
pub mod workload;
