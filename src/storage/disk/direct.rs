//! Writing large uploads around the page cache (`O_DIRECT`).
//!
//! A buffered write copies every byte into page-cache pages; on the VMs we measured,
//! growing the page cache by a gigabyte costs 2-2.5 s of CPU (first touch of guest
//! memory), five times what hashing the same gigabyte costs, and it caps a single
//! upload near 300 MB/s. Written directly, the data goes from one reused, aligned buffer
//! to the device. The price: a freshly uploaded large blob is not in the page cache, so
//! its first download reads the disk. See docs/adr/0003-upload-path.md.
//!
//! `O_DIRECT` wants the buffer address, the length and the file offset aligned to the
//! device's logical block size; we stage data in a buffer aligned to [`ALIGN`] and only
//! ever write whole multiples of it, except for the blob's tail, which is written after
//! turning `O_DIRECT` off again. Any refusal (a filesystem without `O_DIRECT`, such as
//! tmpfs on older kernels, or a stricter alignment) falls back to buffered writes.

use std::fs::File;
use std::io::{self, Write};

use crate::sys::set_direct;
pub(crate) use crate::sys::AlignedBuf;

pub(crate) use crate::sys::ALIGN;
/// Size of the staging buffer, hence of each direct write.
pub(crate) const STAGING: usize = 512 << 10;

/// An output file, written directly when that works and through the page cache when not.
pub(crate) struct OutputFile {
    file: File,
    staging: Option<Staging>,
}

impl OutputFile {
    /// Buffered writes, as for any small file.
    pub(crate) fn buffered(file: File) -> Self {
        OutputFile {
            file,
            staging: None,
        }
    }

    /// Direct writes if the filesystem takes them, else buffered.
    pub(crate) fn direct(file: File) -> Self {
        let staging = Staging::new().filter(|_| set_direct(&file, true).is_ok());
        OutputFile { file, staging }
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    pub(crate) fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        let Some(staging) = &mut self.staging else {
            return self.file.write_all(data);
        };
        if staging.len == 0 && data.as_ptr() as usize % ALIGN == 0 {
            // Already aligned (uploads arrive in aligned buffers): no staging copy.
            let aligned = data.len() / ALIGN * ALIGN;
            if aligned > 0 {
                write_direct(&mut self.file, &data[..aligned])?;
                data = &data[aligned..];
            }
        }
        while !data.is_empty() {
            let n = staging.push(data);
            data = &data[n..];
            if staging.is_full() {
                let full = staging.filled();
                write_direct(&mut self.file, full)?;
                staging.clear();
            }
        }
        Ok(())
    }

    /// Writes what is still staged; the file is complete once this returns.
    pub(crate) fn finish(&mut self) -> io::Result<()> {
        let Some(staging) = self.staging.take() else {
            return Ok(());
        };
        let filled = staging.filled();
        let aligned = filled.len() / ALIGN * ALIGN;
        write_direct(&mut self.file, &filled[..aligned])?;
        set_direct(&self.file, false)?;
        self.file.write_all(&filled[aligned..])
    }
}

/// Writes an aligned run of bytes directly; should the kernel refuse (EINVAL: an
/// alignment the device does not accept), writes it buffered instead.
fn write_direct(file: &mut File, data: &[u8]) -> io::Result<()> {
    match file.write_all(data) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            set_direct(file, false)?;
            file.write_all(data)
        }
        other => other,
    }
}

/// The staging buffer: an aligned buffer filled from the start.
struct Staging {
    buf: AlignedBuf,
    len: usize,
}

impl Staging {
    fn new() -> Option<Self> {
        AlignedBuf::new(STAGING).map(|buf| Staging { buf, len: 0 })
    }

    /// Copies as much of `data` as fits; returns how much that was.
    fn push(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(STAGING - self.len);
        self.buf.copy_in(self.len, &data[..n]);
        self.len += n;
        n
    }

    fn is_full(&self) -> bool {
        self.len == STAGING
    }

    fn filled(&self) -> &[u8] {
        self.buf.prefix(self.len)
    }

    fn clear(&mut self) {
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn roundtrip(sizes: &[usize], direct: bool) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let file = File::create(&path).unwrap();
        let mut out = if direct {
            OutputFile::direct(file)
        } else {
            OutputFile::buffered(file)
        };
        let mut expected = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let chunk: Vec<u8> = (0..n).map(|j| (i * 31 + j * 7) as u8).collect();
            out.write_all(&chunk).unwrap();
            expected.extend_from_slice(&chunk);
        }
        out.finish().unwrap();
        drop(out);
        let mut got = Vec::new();
        File::open(&path).unwrap().read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "content differs");
    }

    #[test]
    fn aligned_input_is_written_whole_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let mut out = OutputFile::direct(File::create(&path).unwrap());
        let mut expected = Vec::new();
        // Aligned pieces of aligned and unaligned lengths, after and between odd ones.
        for (i, n) in [3 * ALIGN, ALIGN + 17, 5, 2 * ALIGN, STAGING]
            .into_iter()
            .enumerate()
        {
            let mut buf = AlignedBuf::new(n).unwrap();
            let chunk: Vec<u8> = (0..n).map(|j| (i * 13 + j * 3) as u8).collect();
            buf.copy_in(0, &chunk);
            out.write_all(buf.prefix(n)).unwrap();
            expected.extend_from_slice(&chunk);
        }
        out.finish().unwrap();
        drop(out);
        let mut got = Vec::new();
        File::open(&path).unwrap().read_to_end(&mut got).unwrap();
        assert!(got == expected, "content differs");
    }

    #[test]
    fn odd_chunk_sizes_and_tails_come_out_whole() {
        for direct in [true, false] {
            roundtrip(&[STAGING + 1, 3, ALIGN - 1, 2 * STAGING, 12345], direct);
            roundtrip(&[STAGING], direct);
            roundtrip(&[1], direct);
            roundtrip(&[], direct);
        }
    }
}
