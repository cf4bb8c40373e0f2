//! The password file: one `user:hash` line per user, `#` comments and blank lines allowed.
//!
//! Hashes written by `edge passwd` are argon2id PHC strings (`$argon2id$v=19$m=...`). Files
//! made by Mosquitto's `mosquitto_passwd` are read as they are:
//! - `$6$<salt>$<hash>`: SHA-512 of the password followed by the salt (Mosquitto 1.x);
//! - `$7$<iterations>$<salt>$<hash>`: PBKDF2-HMAC-SHA512 with a 64-byte output (Mosquitto 2.x);
//!
//! salts and hashes in standard base64 with padding. Any other line is an error at load that
//! names the file and the line, so a typo never silently locks a user out or lets one in.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::Engine as _;
use sha2::{Digest, Sha512};

/// A password file or ACL file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthFileError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A line is malformed.
    #[error("{path}:{line}: {message}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong and how to fix it.
        message: String,
    },
}

/// A stored password hash.
#[derive(Clone)]
pub enum StoredHash {
    /// An argon2 PHC string (as written by `edge passwd`).
    Argon2(String),
    /// Mosquitto 1.x: SHA-512 of password then salt.
    MosquittoSha512 {
        /// Salt bytes.
        salt: Vec<u8>,
        /// Digest.
        hash: Vec<u8>,
    },
    /// Mosquitto 2.x: PBKDF2-HMAC-SHA512.
    MosquittoPbkdf2 {
        /// Iterations.
        iterations: u32,
        /// Salt bytes.
        salt: Vec<u8>,
        /// Derived key.
        hash: Vec<u8>,
    },
}

impl std::fmt::Debug for StoredHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Hashes stay out of logs.
        f.write_str(match self {
            StoredHash::Argon2(_) => "argon2",
            StoredHash::MosquittoSha512 { .. } => "mosquitto-sha512",
            StoredHash::MosquittoPbkdf2 { .. } => "mosquitto-pbkdf2",
        })
    }
}

impl StoredHash {
    /// Parses the hash part of a line; `Err` says what is wrong.
    pub fn parse(text: &str) -> Result<StoredHash, String> {
        let b64 = |s: &str, what: &str| {
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|e| format!("the {what} is not base64: {e}"))
        };
        if text.starts_with("$argon2") {
            PasswordHash::new(text).map_err(|e| format!("not a valid argon2 hash: {e}"))?;
            return Ok(StoredHash::Argon2(text.to_string()));
        }
        if let Some(rest) = text.strip_prefix("$6$") {
            let (salt, hash) = rest
                .split_once('$')
                .ok_or("a $6$ hash is $6$<salt>$<hash>")?;
            let hash = b64(hash, "hash")?;
            if hash.len() != 64 {
                return Err(format!(
                    "a $6$ hash is a 64-byte SHA-512 digest, this one has {} bytes",
                    hash.len()
                ));
            }
            return Ok(StoredHash::MosquittoSha512 {
                salt: b64(salt, "salt")?,
                hash,
            });
        }
        if let Some(rest) = text.strip_prefix("$7$") {
            let mut parts = rest.splitn(3, '$');
            let (Some(iterations), Some(salt), Some(hash)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return Err("a $7$ hash is $7$<iterations>$<salt>$<hash>".into());
            };
            let iterations: u32 = iterations
                .parse()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("{iterations:?} is not an iteration count"))?;
            let hash = b64(hash, "hash")?;
            if hash.is_empty() {
                return Err("the $7$ hash is empty".into());
            }
            return Ok(StoredHash::MosquittoPbkdf2 {
                iterations,
                salt: b64(salt, "salt")?,
                hash,
            });
        }
        Err(
            "unknown hash format: expected an argon2id hash from `edge passwd`, or a \
             mosquitto_passwd hash ($6$ or $7$); a plain-text password is not accepted"
                .into(),
        )
    }

    /// Whether `password` matches. Slow by design (argon2, PBKDF2): call it off the async
    /// runtime.
    pub fn verify(&self, password: &[u8]) -> bool {
        match self {
            StoredHash::Argon2(phc) => match PasswordHash::new(phc) {
                Ok(h) => Argon2::default().verify_password(password, &h).is_ok(),
                Err(_) => false,
            },
            StoredHash::MosquittoSha512 { salt, hash } => {
                let mut d = Sha512::new();
                d.update(password);
                d.update(salt);
                constant_time_eq(&d.finalize(), hash)
            }
            StoredHash::MosquittoPbkdf2 {
                iterations,
                salt,
                hash,
            } => {
                let mut out = vec![0u8; hash.len()];
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, &mut out);
                constant_time_eq(&out, hash)
            }
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A new argon2id hash of `password` with a random salt (the crate's default parameters,
/// which follow OWASP's recommendation).
pub fn hash_password(password: &[u8]) -> Result<String, String> {
    let salt = SaltString::generate(&mut password_hash::rand_core::OsRng);
    Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("hashing the password: {e}"))
}

/// The users of a password file.
#[derive(Debug, Default)]
pub struct PasswordFile {
    users: HashMap<String, StoredHash>,
}

impl PasswordFile {
    /// Reads and parses a password file.
    pub fn load(path: &Path) -> Result<PasswordFile, AuthFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthFileError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses password file text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<PasswordFile, AuthFileError> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let err = |message: String| AuthFileError::Line {
                path: path.to_path_buf(),
                line: i + 1,
                message,
            };
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err(err(
                    "expected user:hash (add users with `edge passwd FILE USER`)".into(),
                ));
            };
            if user.is_empty() {
                return Err(err("the user name is empty".into()));
            }
            let hash = StoredHash::parse(hash).map_err(|m| err(format!("user {user:?}: {m}")))?;
            if users.insert(user.to_string(), hash).is_some() {
                return Err(err(format!(
                    "user {user:?} appears twice: keep one line per user"
                )));
            }
        }
        Ok(PasswordFile { users })
    }

    /// The stored hash of a user.
    pub fn get(&self, user: &str) -> Option<&StoredHash> {
        self.users.get(user)
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether the file has no users.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// The text of a password file after setting (`Some(hash)`) or deleting (`None`) `user`:
/// every other line, comments and Mosquitto hashes included, stays as it was. Returns
/// whether the user was there before.
pub fn edit_file_text(text: &str, user: &str, hash: Option<&str>) -> (String, bool) {
    let mut out = String::with_capacity(text.len() + 128);
    let mut found = false;
    for line in text.lines() {
        let is_user = line
            .split_once(':')
            .is_some_and(|(u, _)| u == user && !line.trim_start().starts_with('#'));
        if is_user {
            if !found {
                if let Some(h) = hash {
                    out.push_str(&format!("{user}:{h}\n"));
                }
            }
            found = true;
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    if !found {
        if let Some(h) = hash {
            out.push_str(&format!("{user}:{h}\n"));
        }
    }
    (out, found)
}

/// Whether a user name can be written to a password file.
pub fn validate_user_name(user: &str) -> Result<(), String> {
    if user.is_empty() {
        return Err("the user name is empty".into());
    }
    if user.contains([':', '\n', '\r', '\0']) || user.starts_with('#') {
        return Err(format!(
            "user name {user:?}: ':', line breaks, NUL and a leading '#' cannot be stored in a password file"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argon2_hash_verifies_only_its_password() {
        let h = hash_password(b"s3cret").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        let stored = StoredHash::parse(&h).unwrap();
        assert!(stored.verify(b"s3cret"));
        assert!(!stored.verify(b"s3cret "));
    }

    #[test]
    fn mosquitto_sha512_hash_verifies() {
        let salt = b"0123456789ab";
        let mut d = Sha512::new();
        d.update(b"pw");
        d.update(salt);
        let b64 = base64::engine::general_purpose::STANDARD;
        let line = format!("$6${}${}", b64.encode(salt), b64.encode(d.finalize()));
        let stored = StoredHash::parse(&line).unwrap();
        assert!(stored.verify(b"pw"));
        assert!(!stored.verify(b"pW"));
    }

    /// Made by `mosquitto_passwd -b` (Mosquitto 2.0.11) for password "secret": the default
    /// PBKDF2 ($7$) and `-H sha512` ($6$). The e2e test checks a fresh file from the installed
    /// tool as well.
    #[test]
    fn real_mosquitto_passwd_hashes_verify() {
        let file = "u:$7$101$Re+95wE+Y1+gy7TI$lkxoEab/EV8y9Bvk8Awk3Pbual8PKEcaPqvmgAc3+921S+VWE+gkCCbd7drTSZmzroxCmyG7SW4NJ2dFOkj1bA==\n\
                    v:$6$2AIni6QaZzr9o0HW$Qzp4LnRQ85V1dpgDcK8wIZZuNH57R0f9B4Bpda++KkeAR7WuTkkpRcCB5YhXxwy4hUV0zGk4R93xEP7SJI2dEw==\n";
        let f = PasswordFile::parse(file, Path::new("mosquitto.pw")).unwrap();
        for user in ["u", "v"] {
            let stored = f.get(user).unwrap();
            assert!(stored.verify(b"secret"), "{user}");
            assert!(!stored.verify(b"Secret"), "{user}");
        }
        assert!(matches!(
            f.get("u"),
            Some(StoredHash::MosquittoPbkdf2 {
                iterations: 101,
                ..
            })
        ));
        assert!(matches!(
            f.get("v"),
            Some(StoredHash::MosquittoSha512 { .. })
        ));
    }

    #[test]
    fn bad_lines_are_named_with_file_and_line() {
        let p = Path::new("pw");
        let err = PasswordFile::parse("# c\n\nbob:plain\n", p)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("pw:3: user \"bob\": unknown hash format"),
            "{err}"
        );
        let err = PasswordFile::parse("nocolon\n", p).unwrap_err().to_string();
        assert!(err.starts_with("pw:1: expected user:hash"), "{err}");
        let err = PasswordFile::parse("a:$7$x$AA==$AA==\n", p)
            .unwrap_err()
            .to_string();
        assert!(err.contains("pw:1") && err.contains("iteration"), "{err}");
        let err = PasswordFile::parse("a:$6$AA==$AAAA\n", p)
            .unwrap_err()
            .to_string();
        assert!(err.contains("64-byte"), "{err}");
        let h = hash_password(b"x").unwrap();
        let err = PasswordFile::parse(&format!("a:{h}\nb:{h}\na:{h}\n"), p)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("pw:3: user \"a\" appears twice"), "{err}");
    }

    #[test]
    fn editing_replaces_one_user_and_keeps_other_lines() {
        let text = "# users\nalice:$6$old\nbob:$7$101$x$y\n";
        let (out, found) = edit_file_text(text, "alice", Some("$argon2id$new"));
        assert!(found);
        assert_eq!(out, "# users\nalice:$argon2id$new\nbob:$7$101$x$y\n");
        let (out, found) = edit_file_text(&out, "carol", Some("$argon2id$c"));
        assert!(!found);
        assert!(
            out.ends_with("bob:$7$101$x$y\ncarol:$argon2id$c\n"),
            "{out}"
        );
        let (out, found) = edit_file_text(&out, "bob", None);
        assert!(found);
        assert_eq!(out, "# users\nalice:$argon2id$new\ncarol:$argon2id$c\n");
    }

    #[test]
    fn user_names_that_break_the_format_are_refused() {
        assert!(validate_user_name("dev-a").is_ok());
        assert!(validate_user_name("a:b").is_err());
        assert!(validate_user_name("").is_err());
        assert!(validate_user_name("#x").is_err());
    }
}
