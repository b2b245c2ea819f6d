//! Integration tests of nas-controller through its public API only.

mod synthetic;
