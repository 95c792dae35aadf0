//! uinput
