//! Walking `Directory` trees stored in the CAS: completeness checks for asset integrity
//! and the breadth-first listing behind GetTree.

use super::cas::{CasError, CasStore};
use super::digest::{Digest, DigestError};
use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use prost::Message;
use std::collections::{HashSet, VecDeque};

/// Directory blobs larger than this are refused rather than decoded (a real Directory
/// with tens of thousands of entries is a few MiB).
const MAX_DIRECTORY_BLOB: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("blob {digest} is not a valid Directory message: {reason}")]
    NotADirectory { digest: Digest, reason: String },
    #[error("directory {parent} names an invalid digest: {source}")]
    BadChild {
        parent: Digest,
        #[source]
        source: DigestError,
    },
    #[error(transparent)]
    Cas(#[from] CasError),
}

/// Reads and decodes one Directory; `None` when the blob is absent.
pub fn read_directory(cas: &CasStore, d: &Digest) -> Result<Option<reapi::Directory>, TreeError> {
    if d.size() > MAX_DIRECTORY_BLOB {
        return Err(TreeError::NotADirectory {
            digest: d.clone(),
            reason: format!("{} bytes is larger than any Directory we accept", d.size()),
        });
    }
    let Some(bytes) = cas.read_all(d)? else {
        return Ok(None);
    };
    reapi::Directory::decode(bytes.as_slice())
        .map(Some)
        .map_err(|e| TreeError::NotADirectory {
            digest: d.clone(),
            reason: e.to_string(),
        })
}

fn children(
    parent: &Digest,
    dir: &reapi::Directory,
) -> Result<(Vec<Digest>, Vec<Digest>), TreeError> {
    let bad = |source| TreeError::BadChild {
        parent: parent.clone(),
        source,
    };
    let files = dir
        .files
        .iter()
        .map(|f| Digest::from_proto(f.digest.as_ref()).map_err(bad))
        .collect::<Result<_, _>>()?;
    let dirs = dir
        .directories
        .iter()
        .map(|n| Digest::from_proto(n.digest.as_ref()).map_err(bad))
        .collect::<Result<_, _>>()?;
    Ok((files, dirs))
}

/// Checks that `root` and everything below it is present, refreshing each object's LRU
/// stamp on the way. Returns the first missing digest, if any.
pub fn first_missing_in_tree(cas: &CasStore, root: &Digest) -> Result<Option<Digest>, TreeError> {
    let mut seen_dirs = HashSet::new();
    let mut seen_files = HashSet::new();
    let mut queue = VecDeque::from([root.clone()]);
    while let Some(d) = queue.pop_front() {
        if !seen_dirs.insert(d.clone()) {
            continue;
        }
        let Some(dir) = read_directory(cas, &d)? else {
            return Ok(Some(d));
        };
        let (files, dirs) = children(&d, &dir)?;
        for f in files {
            if seen_files.insert(f.clone()) && !cas.contains(&f) {
                return Ok(Some(f));
            }
        }
        queue.extend(dirs);
    }
    Ok(None)
}

/// The breadth-first, de-duplicated listing of the tree under a root, behind GetTree.
/// It stops after any page and continues from where it stopped, so listing a tree in
/// pages reads each directory once however many pages it takes (the walk's frontier,
/// its de-duplication set and the directory that showed more follow, are kept).
pub struct TreeWalk {
    root: Digest,
    queue: VecDeque<Digest>,
    seen: HashSet<Digest>,
    /// Read and found present, not yet listed: the directory that showed the last page
    /// was not the end.
    pending: Option<(Digest, reapi::Directory)>,
    /// Directories listed (or skipped) so far: the position a page token names.
    listed: usize,
}

impl TreeWalk {
    pub fn new(root: &Digest) -> Self {
        TreeWalk {
            root: root.clone(),
            queue: VecDeque::from([root.clone()]),
            seen: HashSet::new(),
            pending: None,
            listed: 0,
        }
    }

    pub fn root(&self) -> &Digest {
        &self.root
    }

    /// Directories listed (or skipped) so far.
    pub fn listed(&self) -> usize {
        self.listed
    }

    /// The next page of at most `max` (at least 1) directories, and whether more
    /// follow. Missing subtrees are left out, as REAPI allows. `None` if the root is
    /// absent.
    pub fn next_page(
        &mut self,
        max: usize,
        read: &mut impl FnMut(&Digest) -> Result<Option<reapi::Directory>, TreeError>,
    ) -> Result<Option<(Vec<reapi::Directory>, bool)>, TreeError> {
        let mut page = Vec::new();
        let more = self.advance(max, read, |dir| page.push(dir))?;
        Ok(more.map(|more| (page, more)))
    }

    /// Passes over `n` directories without listing them (a page token of a walk that
    /// is no longer held). `None` if the root is absent.
    pub fn skip(
        &mut self,
        n: usize,
        read: &mut impl FnMut(&Digest) -> Result<Option<reapi::Directory>, TreeError>,
    ) -> Result<Option<()>, TreeError> {
        if n == 0 {
            return Ok(Some(()));
        }
        Ok(self.advance(n, read, drop)?.map(|_| ()))
    }

    /// Hands the next `max` present directories to `take`; says whether more follow.
    fn advance(
        &mut self,
        max: usize,
        read: &mut impl FnMut(&Digest) -> Result<Option<reapi::Directory>, TreeError>,
        mut take: impl FnMut(reapi::Directory),
    ) -> Result<Option<bool>, TreeError> {
        let mut taken = 0;
        loop {
            let (d, dir) = match self.pending.take() {
                Some(next) => next,
                None => {
                    let Some(d) = self.queue.pop_front() else {
                        return Ok(Some(false));
                    };
                    if !self.seen.insert(d.clone()) {
                        continue;
                    }
                    match read(&d)? {
                        Some(dir) => (d, dir),
                        // Only the root is read before anything is listed.
                        None if self.listed == 0 => return Ok(None),
                        None => continue,
                    }
                }
            };
            if taken == max {
                self.pending = Some((d, dir));
                return Ok(Some(true));
            }
            let (_, dirs) = children(&d, &dir)?;
            self.queue.extend(dirs);
            take(dir);
            taken += 1;
            self.listed += 1;
        }
    }
}

/// Walks of client-paged GetTree calls between one page and the next, so that the next
/// call continues the walk instead of re-reading the tree up to where it stopped. Bounded
/// in number and age; a token whose walk is gone (expired, pushed out, or issued by
/// another process) still works, by walking again from the root.
#[derive(Default)]
pub struct SuspendedWalks {
    walks: std::sync::Mutex<VecDeque<(u64, std::time::Instant, TreeWalk)>>,
    next_id: std::sync::atomic::AtomicU64,
}

/// Walks kept between pages; a walk holds its queue and de-duplication set (tens of
/// bytes per directory of the tree).
const SUSPENDED_WALKS: usize = 16;
/// How long a suspended walk waits for its next page.
const SUSPENDED_FOR: std::time::Duration = std::time::Duration::from_secs(120);

impl SuspendedWalks {
    /// Keeps `walk` for its next page; returns the page token that continues it.
    pub fn suspend(&self, walk: TreeWalk) -> String {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let token = format!("{}:{id}", walk.listed());
        let mut walks = self.walks.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        walks.retain(|(_, at, _)| now.duration_since(*at) < SUSPENDED_FOR);
        if walks.len() >= SUSPENDED_WALKS {
            walks.pop_front();
        }
        walks.push_back((id, now, walk));
        token
    }

    /// The walk of `root` that `token` continues: the held one, or (when it is gone, and
    /// for tokens of the form `<position>`) a new walk that reads the tree again up to
    /// the token's position. `None` if the root is absent.
    pub fn resume(
        &self,
        root: &Digest,
        token: PageToken,
        read: &mut impl FnMut(&Digest) -> Result<Option<reapi::Directory>, TreeError>,
    ) -> Result<Option<TreeWalk>, TreeError> {
        if let Some(id) = token.walk {
            let mut walks = self.walks.lock().unwrap_or_else(|e| e.into_inner());
            let held = walks
                .iter()
                .position(|(i, _, w)| *i == id && w.root() == root && w.listed() == token.position);
            if let Some((_, _, walk)) = held.and_then(|at| walks.remove(at)) {
                return Ok(Some(walk));
            }
        }
        let mut walk = TreeWalk::new(root);
        Ok(walk.skip(token.position, read)?.map(|()| walk))
    }
}

/// Where a GetTree page continues: `<position>` (directories already listed) or
/// `<position>:<walk>` (and the suspended walk that got there).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageToken {
    position: usize,
    walk: Option<u64>,
}

impl PageToken {
    /// Parses a token this server issued (the empty token starts at the root).
    pub fn parse(token: &str) -> Result<Self, BadPageToken> {
        if token.is_empty() {
            return Ok(PageToken::default());
        }
        let (position, walk) = match token.split_once(':') {
            Some((p, id)) => (p, Some(id.parse::<u64>().map_err(|_| BadPageToken)?)),
            None => (token, None),
        };
        let position = position.parse().map_err(|_| BadPageToken)?;
        Ok(PageToken { position, walk })
    }
}

/// A GetTree page token this server did not issue.
#[derive(Debug)]
pub struct BadPageToken;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A tree held in memory whose reads are counted per directory.
    struct Counting {
        dirs: HashMap<Digest, reapi::Directory>,
        reads: HashMap<Digest, usize>,
    }

    impl Counting {
        fn read(&mut self, d: &Digest) -> Result<Option<reapi::Directory>, TreeError> {
            *self.reads.entry(d.clone()).or_default() += 1;
            Ok(self.dirs.get(d).cloned())
        }
    }

    fn digest_of(dir: &reapi::Directory) -> Digest {
        Digest::of_bytes(&dir.encode_to_vec())
    }

    fn node(name: &str, d: &Digest) -> reapi::DirectoryNode {
        reapi::DirectoryNode {
            name: name.into(),
            digest: Some(d.to_proto()),
        }
    }

    /// A root with `width` children, each with `width` grandchildren shared by all, plus
    /// one missing subtree: `1 + 2 * width` present directories.
    fn tree(width: usize) -> (Digest, Counting) {
        let mut dirs = HashMap::new();
        let leaves: Vec<reapi::Directory> = (0..width)
            .map(|i| reapi::Directory {
                node_properties: None,
                directories: vec![],
                files: vec![reapi::FileNode {
                    name: format!("leaf{i}"),
                    digest: Some(Digest::empty().to_proto()),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect();
        let leaf_nodes: Vec<_> = leaves
            .iter()
            .enumerate()
            .map(|(i, l)| node(&format!("l{i}"), &digest_of(l)))
            .collect();
        for l in leaves {
            dirs.insert(digest_of(&l), l);
        }
        let mids: Vec<reapi::Directory> = (0..width)
            .map(|i| reapi::Directory {
                directories: leaf_nodes.clone(),
                symlinks: vec![reapi::SymlinkNode {
                    name: format!("m{i}"),
                    target: "x".into(),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect();
        let missing = Digest::of_bytes(b"not stored");
        let mut root_nodes: Vec<_> = mids
            .iter()
            .enumerate()
            .map(|(i, m)| node(&format!("m{i}"), &digest_of(m)))
            .collect();
        root_nodes.push(node("gone", &missing));
        for m in mids {
            dirs.insert(digest_of(&m), m);
        }
        let root = reapi::Directory {
            directories: root_nodes,
            ..Default::default()
        };
        let root_digest = digest_of(&root);
        dirs.insert(root_digest.clone(), root);
        let store = Counting {
            dirs,
            reads: HashMap::new(),
        };
        (root_digest, store)
    }

    fn listed(pages: &[Vec<reapi::Directory>]) -> Vec<Digest> {
        pages.iter().flatten().map(digest_of).collect()
    }

    #[test]
    fn paging_reads_each_directory_once() {
        for page in [1, 2, 3, 7, 100] {
            let (root, mut store) = tree(6);
            let mut walk = TreeWalk::new(&root);
            let mut pages = Vec::new();
            let mut read = |d: &Digest| store.read(d);
            loop {
                let (dirs, more) = walk.next_page(page, &mut read).unwrap().unwrap();
                assert!(dirs.len() <= page);
                pages.push(dirs);
                if !more {
                    break;
                }
                assert!(pages.len() < 100, "paging does not terminate");
            }
            let got = listed(&pages);
            assert_eq!(got.len(), 13, "page size {page}");
            assert_eq!(got.iter().collect::<HashSet<_>>().len(), 13);
            assert_eq!(got[0], root);
            // 13 present directories and the missing one: one read each.
            assert_eq!(store.reads.len(), 14);
            assert!(store.reads.values().all(|&n| n == 1), "{:?}", store.reads);
        }
    }

    #[test]
    fn paging_across_calls_continues_the_suspended_walk() {
        let (root, mut store) = tree(6);
        let walks = SuspendedWalks::default();
        let mut read = |d: &Digest| store.read(d);
        let (mut token, mut pages) = (String::new(), Vec::new());
        loop {
            let parsed = PageToken::parse(&token).unwrap();
            let mut walk = walks.resume(&root, parsed, &mut read).unwrap().unwrap();
            let (dirs, more) = walk.next_page(2, &mut read).unwrap().unwrap();
            pages.push(dirs);
            if !more {
                break;
            }
            token = walks.suspend(walk);
        }
        assert_eq!(pages.len(), 7);
        assert_eq!(listed(&pages).iter().collect::<HashSet<_>>().len(), 13);
        assert_eq!(store.reads.len(), 14);
        assert!(store.reads.values().all(|&n| n == 1), "{:?}", store.reads);
    }

    #[test]
    fn a_token_whose_walk_is_gone_walks_again_to_the_same_place() {
        let (root, mut store) = tree(6);
        let mut read = |d: &Digest| store.read(d);
        let mut whole = TreeWalk::new(&root);
        let (all, _) = whole.next_page(100, &mut read).unwrap().unwrap();
        let walks = SuspendedWalks::default();
        for token in ["5", "5:999"] {
            let parsed = PageToken::parse(token).unwrap();
            let mut walk = walks.resume(&root, parsed, &mut read).unwrap().unwrap();
            let (rest, more) = walk.next_page(100, &mut read).unwrap().unwrap();
            assert!(!more);
            assert_eq!(rest, all[5..].to_vec(), "token {token}");
        }
        for bad in ["x", "5:", "-1", "5:x", "1.5", ":3"] {
            assert!(PageToken::parse(bad).is_err(), "{bad}");
        }
        let absent = Digest::of_bytes(b"no root");
        let mut fresh = TreeWalk::new(&absent);
        assert!(fresh.next_page(1, &mut read).unwrap().is_none());
        let three = PageToken::parse("3").unwrap();
        assert!(walks.resume(&absent, three, &mut read).unwrap().is_none());
    }

    #[test]
    fn suspended_walks_are_bounded() {
        let walks = SuspendedWalks::default();
        let root = Digest::of_bytes(b"r");
        for _ in 0..SUSPENDED_WALKS * 3 {
            walks.suspend(TreeWalk::new(&root));
        }
        assert_eq!(walks.walks.lock().unwrap().len(), SUSPENDED_WALKS);
    }
}
