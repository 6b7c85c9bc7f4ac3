//! The provider's lease manager (DESIGN section 7 and 9).

pub mod db;
