//! Evaluation on LoCoMo. `metrics` scores answers exactly as LoCoMo's official
//! evaluation code does; `locomo` holds a run's journalled predictions and its report
//! (the runner is `memlora eval locomo`).

pub mod locomo;
pub mod metrics;
