//! What a login name may be. A leaf: both the image manifest (`login_user`) and the
//! lease spec (`ssh_user`) check names with it, and either name is written into the
//! guest's user-data and passwd.

/// A POSIX-portable login name: 1-32 characters of `a-z`, `0-9`, `_` and `-`, starting
/// with a letter or `_`.
pub(crate) fn is_valid_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}
