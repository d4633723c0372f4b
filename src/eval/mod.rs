//! Evaluation on LoCoMo. `metrics` scores answers exactly as LoCoMo's official
//! evaluation code does; the runner (`memlora eval locomo`) builds on it.

pub mod metrics;
