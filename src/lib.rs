//! memlora: a private, fully local terminal assistant whose small language
//! model keeps long-term memories with one LoRA adapter per memory operation.
//! See docs/ARCHITECTURE.md for the map.

pub mod adapters;
pub mod assistant;
pub mod config;
pub mod daemon;
pub mod distill;
pub mod engine;
#[doc(hidden)]
pub mod fuzzing;
pub mod eval;
pub mod images;
pub mod memory;
pub mod models;
pub mod transcript;
mod vector;
pub mod vision;
pub mod worker;
