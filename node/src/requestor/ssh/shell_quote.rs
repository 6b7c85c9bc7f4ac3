//! The remote command line for `peervm exec L -- argv...`: SSH carries one string, which
//! the guest's login shell (POSIX `sh`) splits again, so each argument is quoted for that
//! shell and the command run is exactly the argv given (README "Requestor"). Plain `ssh`
//! joins its arguments with spaces instead; `peervm ssh` keeps that behaviour.

/// Characters that `sh` reads as themselves anywhere in a word.
fn is_plain(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/' | ',' | ':' | '=' | '+' | '@' | '%')
}

/// One argument as one `sh` word: unchanged when every character is plain, otherwise in
/// single quotes (inside which `sh` interprets nothing, newlines included), with each
/// `'` written as `'\''`. The empty argument is `''`.
pub fn quote_arg(arg: &str) -> String {
    if !arg.is_empty() && arg.chars().all(is_plain) {
        return arg.to_owned();
    }
    let mut quoted = String::with_capacity(arg.len() + 2);
    quoted.push('\'');
    for c in arg.chars() {
        if c == '\'' {
            quoted.push_str("'\\''");
        } else {
            quoted.push(c);
        }
    }
    quoted.push('\'');
    quoted
}

/// The command line that makes the remote `sh` run exactly `argv`.
pub fn command_line(argv: &[String]) -> String {
    argv.iter().map(|a| quote_arg(a)).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The argv a real `/bin/sh` hands to a program when it runs `line`.
    fn argv_seen_by_sh(line: &str) -> Vec<String> {
        // printf prints each argument after the first followed by a NUL
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("printf '%s\\0' {line}"))
            .output()
            .expect("/bin/sh runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let mut words: Vec<String> =
            out.stdout.split(|b| *b == 0).map(|w| String::from_utf8(w.to_vec()).unwrap()).collect();
        assert_eq!(words.pop().as_deref(), Some(""), "output ends in a NUL");
        words
    }

    #[test]
    fn plain_words_stay_as_they_are_and_others_are_single_quoted() {
        assert_eq!(quote_arg("uname"), "uname");
        assert_eq!(quote_arg("-a"), "-a");
        assert_eq!(quote_arg("/etc/os-release"), "/etc/os-release");
        assert_eq!(quote_arg(""), "''");
        assert_eq!(quote_arg("exit 7"), "'exit 7'");
        assert_eq!(quote_arg("it's"), "'it'\\''s'");
        assert_eq!(quote_arg("$HOME"), "'$HOME'");
        assert_eq!(command_line(&["sh".into(), "-c".into(), "exit 7".into()]), "sh -c 'exit 7'");
    }

    #[test]
    fn sh_sees_exactly_the_argv_given() {
        let cases: &[&[&str]] = &[
            &["plain", "words"],
            &["two words", "", "", "after empties"],
            &["single ' quote", "''", "'", "a'b'c"],
            &["double \" quote", "back\\slash", "\\'"],
            &["$HOME", "${PATH}", "$(id)", "`id`", "$$", "$1"],
            &["line one\nline two", "\n", "tab\there", "trailing newline\n"],
            &["; rm -rf /", "a && b", "a | b", "> file", "< file", "&", "*", "?", "[a]", "~", "#comment", "!"],
            &["ünïcödé", "emoji 🦀", "=", "-n", "--"],
        ];
        for argv in cases {
            let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
            assert_eq!(argv_seen_by_sh(&command_line(&argv)), argv, "line: {}", command_line(&argv));
        }
    }

    #[test]
    fn the_exit_code_of_sh_c_passes_through_the_quoting() {
        let line = command_line(&["sh".into(), "-c".into(), "exit 7".into()]);
        let status = std::process::Command::new("/bin/sh").arg("-c").arg(&line).status().expect("/bin/sh runs");
        assert_eq!(status.code(), Some(7));
    }
}
