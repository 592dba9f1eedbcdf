//! The machine stage: the pure QEMU argument builder, accelerator choice,
//! QMP control, and the lifecycle of one builder VM.

pub mod accel;
pub mod args;
pub mod machine;
pub mod qmp;

pub use accel::AccelChoice;
pub use args::{Accelerator, ExtraDisk, MachineSpec, Network};
pub use machine::{BootOptions, LaunchedMachine, Machine, VmError};
