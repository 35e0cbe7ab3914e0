//! Calibration (H6 fills this in).
