//! ByteStream resource names:
//! - read:  `[instance/]blobs/<hash>/<size>`
//! - write: `[instance/]uploads/<uuid>/blobs/<hash>/<size>[/anything]`, and casd's
//!   `[instance/]uploads/blobs/<hash>/<size>` without an upload id.
//!
//! REAPI reserves the segments `blobs`, `uploads`, `compressed-blobs`, so the first of
//! them ends the instance name.
//!
//! An instance name has no empty segment: `/blobs/...` is not the empty instance's
//! name said another way but a malformed one, and so is `a//b/blobs/...`.

use crate::storage::digest::{truncate_for_message, Digest};
use tonic::Status;

#[derive(Debug, PartialEq, Eq)]
pub struct ResourceName {
    pub instance: String,
    pub digest: Digest,
}

fn invalid(name: &str, why: &str) -> Status {
    Status::invalid_argument(format!(
        "invalid resource name {:?}: {why}",
        truncate_for_message(name)
    ))
}

fn compressed(name: &str) -> Status {
    invalid(
        name,
        "compressed-blobs are not supported (this server advertises no compressors)",
    )
}

/// Segments REAPI forbids in an instance name, so that resource names parse.
const KEYWORDS: [&str; 7] = [
    "blobs",
    "uploads",
    "actions",
    "actionResults",
    "operations",
    "capabilities",
    "compressed-blobs",
];

/// Checks an instance name given on the command line: one that resource names could
/// not carry would be accepted at start-up and then fail every ByteStream call.
pub fn check_instance_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Ok(());
    }
    for seg in name.split('/') {
        if seg.is_empty() {
            return Err("an instance name must not start or end with '/' or contain '//'".into());
        }
        if KEYWORDS.contains(&seg) {
            return Err(format!(
                "{seg:?} cannot be a segment of an instance name: REAPI reserves it for \
                 resource names (reserved: {})",
                KEYWORDS.join(", ")
            ));
        }
    }
    Ok(())
}

/// The instance name: the segments before the first keyword, none of them empty.
fn instance_of(name: &str, segs: &[&str], keyword_at: usize) -> Result<String, Status> {
    let instance = &segs[..keyword_at];
    if instance.iter().any(|s| s.is_empty()) {
        return Err(invalid(
            name,
            "empty segment in the instance name (a leading '/' or a '//')",
        ));
    }
    Ok(instance.join("/"))
}

fn digest_at(name: &str, segs: &[&str], at: usize) -> Result<Digest, Status> {
    match (segs.get(at), segs.get(at + 1)) {
        (Some(h), Some(s)) => Digest::parse_parts(h, s).map_err(|e| invalid(name, &e.to_string())),
        _ => Err(invalid(name, "expected <hash>/<size> after \"blobs\"")),
    }
}

pub fn parse_read(name: &str) -> Result<ResourceName, Status> {
    let segs: Vec<&str> = name.split('/').collect();
    let Some(i) = segs
        .iter()
        .position(|s| matches!(*s, "blobs" | "compressed-blobs" | "uploads"))
    else {
        return Err(invalid(name, "expected [instance/]blobs/<hash>/<size>"));
    };
    match segs[i] {
        "compressed-blobs" => return Err(compressed(name)),
        "uploads" => return Err(invalid(name, "an uploads/ name cannot be read")),
        _ => {}
    }
    if segs.len() != i + 3 {
        return Err(invalid(name, "expected [instance/]blobs/<hash>/<size>"));
    }
    Ok(ResourceName {
        instance: instance_of(name, &segs, i)?,
        digest: digest_at(name, &segs, i + 1)?,
    })
}

pub fn parse_write(name: &str) -> Result<ResourceName, Status> {
    let segs: Vec<&str> = name.split('/').collect();
    let Some(i) = segs
        .iter()
        .position(|s| matches!(*s, "blobs" | "compressed-blobs" | "uploads"))
    else {
        return Err(invalid(
            name,
            "expected [instance/]uploads/<uuid>/blobs/<hash>/<size>",
        ));
    };
    if segs[i] != "uploads" {
        return Err(invalid(
            name,
            "writes go to [instance/]uploads/<uuid>/blobs/<hash>/<size>",
        ));
    }
    // casd's form without an upload id: uploads/blobs/<hash>/<size>.
    let blobs_at =
        if segs.get(i + 1) == Some(&"blobs") && segs.get(i + 2).is_some_and(|h| h.len() == 64) {
            i + 1
        } else {
            match segs.get(i + 1) {
                Some(id) if !id.is_empty() => i + 2,
                _ => return Err(invalid(name, "missing upload id after \"uploads/\"")),
            }
        };
    match segs.get(blobs_at) {
        Some(&"blobs") => {}
        Some(&"compressed-blobs") => return Err(compressed(name)),
        _ => {
            return Err(invalid(
                name,
                "expected [instance/]uploads/<uuid>/blobs/<hash>/<size>",
            ))
        }
    }
    Ok(ResourceName {
        instance: instance_of(name, &segs, i)?,
        digest: digest_at(name, &segs, blobs_at + 1)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::digest::EMPTY_SHA256;

    #[test]
    fn read_names() {
        let r = parse_read(&format!("blobs/{EMPTY_SHA256}/0")).unwrap();
        assert_eq!(r.instance, "");
        let r = parse_read(&format!("a/b/blobs/{EMPTY_SHA256}/0")).unwrap();
        assert_eq!(r.instance, "a/b");
        for bad in [
            "".to_string(),
            "blobs".into(),
            format!("blobs/{EMPTY_SHA256}"),
            format!("blobs/{EMPTY_SHA256}/x"),
            format!("blobs/{EMPTY_SHA256}/-1"),
            format!("blobs/{EMPTY_SHA256}/0/extra"),
            format!("compressed-blobs/zstd/{EMPTY_SHA256}/0"),
            "blobs/../../../etc/passwd/0".into(),
            format!("uploads/u/blobs/{EMPTY_SHA256}/0"),
            format!("/blobs/{EMPTY_SHA256}/0"),
            format!("//blobs/{EMPTY_SHA256}/0"),
            format!("/a/blobs/{EMPTY_SHA256}/0"),
            format!("a//b/blobs/{EMPTY_SHA256}/0"),
            format!("a/b//blobs/{EMPTY_SHA256}/0"),
        ] {
            let e = parse_read(&bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn write_names() {
        let u = uuid::Uuid::new_v4();
        let r = parse_write(&format!("uploads/{u}/blobs/{EMPTY_SHA256}/0")).unwrap();
        assert_eq!(r.instance, "");
        let r = parse_write(&format!(
            "inst/uploads/{u}/blobs/{EMPTY_SHA256}/0/meta/data"
        ))
        .unwrap();
        assert_eq!(r.instance, "inst");
        let r = parse_write(&format!("uploads/blobs/{EMPTY_SHA256}/0")).unwrap();
        assert_eq!(r.digest.size(), 0);
        for bad in [
            format!("blobs/{EMPTY_SHA256}/0"),
            format!("uploads//blobs/{EMPTY_SHA256}/0"),
            format!("uploads/{u}/{EMPTY_SHA256}/0"),
            format!("uploads/{u}/compressed-blobs/zstd/{EMPTY_SHA256}/0"),
            format!("uploads/{u}/blobs/{}/0", &EMPTY_SHA256[1..]),
            format!("uploads/{u}/blobs/{EMPTY_SHA256}"),
            format!("/uploads/{u}/blobs/{EMPTY_SHA256}/0"),
            format!("a//uploads/{u}/blobs/{EMPTY_SHA256}/0"),
        ] {
            let e = parse_write(&bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn instance_names_for_the_command_line() {
        for good in ["", "foo", "a/b", "blobs2", "my-uploads", "Blobs"] {
            assert_eq!(check_instance_name(good), Ok(()), "{good}");
        }
        for bad in [
            "blobs",
            "uploads",
            "compressed-blobs",
            "actionResults",
            "a/blobs",
            "uploads/x",
            "a/operations/b",
            "/a",
            "a/",
            "a//b",
            "/",
        ] {
            assert!(check_instance_name(bad).is_err(), "{bad}");
        }
    }
}
