//! Requestor lease persistence (SQLite).
