//! A user of the host's user database, by name: the QEMU user (qemu_user.rs) and the
//! provider daemon's user, whom the VMM helper lets in (docs/vmm.md "The VMM helper").

use std::ffi::CString;
use std::io;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    /// The primary group.
    pub gid: u32,
}

impl Account {
    /// `Ok(None)` when no such user exists.
    pub fn lookup(name: &str) -> io::Result<Option<Account>> {
        let cname =
            CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "user name contains NUL"))?;
        // SAFETY: a zeroed passwd is a valid out-parameter for getpwnam_r
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: getpwnam_r with valid pointers and the buffer's real length
        let rc = unsafe { libc::getpwnam_r(cname.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        if result.is_null() {
            return Ok(None);
        }
        Ok(Some(Account { name: name.to_string(), uid: pwd.pw_uid, gid: pwd.pw_gid }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_root_and_not_a_missing_user() {
        let root = Account::lookup("root").unwrap().unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(Account::lookup("peervm-no-such-user-x").unwrap(), None);
        assert!(Account::lookup("a\0b").is_err());
    }
}
