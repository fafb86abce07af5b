//! A writer for the `newc` cpio format, the one the kernel unpacks as an initramfs.

use std::io::{self, Write};

const MAGIC: &str = "070701";
/// Directory bit of a cpio `mode`.
pub(crate) const S_IFDIR: u32 = 0o040000;
/// Regular-file bit of a cpio `mode`.
pub(crate) const S_IFREG: u32 = 0o100000;
/// Character-device bit of a cpio `mode`.
pub(crate) const S_IFCHR: u32 = 0o020000;

/// Streams cpio entries into `out`; `finish` writes the trailer.
pub(crate) struct CpioWriter<W: Write> {
    out: W,
    ino: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    pub(crate) fn new(out: W) -> Self {
        CpioWriter {
            out,
            ino: 1,
            written: 0,
        }
    }

    pub(crate) fn dir(&mut self, name: &str) -> io::Result<()> {
        self.entry(name, S_IFDIR | 0o755, 2, (0, 0), &[])
    }

    pub(crate) fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | perm, 1, (0, 0), data)
    }

    pub(crate) fn char_dev(&mut self, name: &str, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, S_IFCHR | 0o600, 1, (major, minor), &[])
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        if name.is_empty() || name.starts_with('/') || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad cpio entry name {name:?}"),
            ));
        }
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{name} is over 4 GiB"))
        })?;
        let ino = self.ino;
        self.ino += 1;
        let namesize = name.len() + 1;
        let header = format!(
            "{MAGIC}{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
            0, 0, 0, 0, 0, rdev.0, rdev.1, 0
        );
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let rem = (self.written % 4) as usize;
        if rem != 0 {
            self.put(&[0u8; 3][..4 - rem])?;
        }
        Ok(())
    }

    /// Writes the trailer and returns the inner writer.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(buf: &[u8], at: usize, idx: usize) -> u32 {
        let s = std::str::from_utf8(&buf[at + 6 + idx * 8..at + 6 + idx * 8 + 8]).unwrap();
        u32::from_str_radix(s, 16).unwrap()
    }

    #[test]
    fn entries_are_newc_with_four_byte_alignment() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("init", 0o755, b"#!/bin/sh\n").unwrap();
        w.dir("bin").unwrap();
        let buf = w.finish().unwrap();
        assert_eq!(&buf[..6], b"070701");
        assert_eq!(field(&buf, 0, 1), S_IFREG | 0o755);
        assert_eq!(field(&buf, 0, 6), 10, "file size");
        assert_eq!(field(&buf, 0, 11), 5, "name size includes the NUL");
        // header 110 + "init\0" 5 = 115 -> padded to 116; data 10 -> padded to 12.
        assert_eq!(&buf[116..126], b"#!/bin/sh\n");
        assert_eq!(&buf[128..134], b"070701");
        assert_eq!(field(&buf, 128, 1), S_IFDIR | 0o755);
        assert_eq!(buf.len() % 4, 0);
        assert!(buf.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn absolute_or_empty_names_are_rejected() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(w.file("/init", 0o755, b"").is_err());
        assert!(w.dir("").is_err());
        assert!(w.file("a\0b", 0o644, b"").is_err());
    }
}
