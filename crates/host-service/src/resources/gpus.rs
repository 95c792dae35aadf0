//! gpus
