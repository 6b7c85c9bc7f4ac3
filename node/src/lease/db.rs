//! Provider lease persistence (SQLite).
