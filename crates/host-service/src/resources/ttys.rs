//! ttys
