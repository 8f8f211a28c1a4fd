//! Placeholder: the simulator (issue 3).
