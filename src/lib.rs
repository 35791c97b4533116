//! scap: content-addressed deploys for a fleet of MediaWiki app servers.
//!
//! The data path, one module per stage (see ARCHITECTURE.md):
//! staging -> [`manifest`] -> [`store`] -> (net -> host store -> release ->
//! symlink switch, in later modules).

pub mod cli;
pub mod fleet;
pub mod host;
pub mod manifest;
pub mod net;
pub mod progress;
pub mod store;
pub mod time;
pub mod web;
