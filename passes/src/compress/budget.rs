//! Accuracy budget (H6 fills this in).
