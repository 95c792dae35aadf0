//! The default algorithm: keep a buffer of free mandelboxes per region.
