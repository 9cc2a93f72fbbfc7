//! Durable small-file writes: the key store's files must never be half
//! written (a torn wrapped key is a lost key), and a shredded file must not
//! leave its old bytes behind in the same inode.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use crate::KeyError;

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> KeyError + 'a {
    move |source| KeyError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Syncs a directory so a rename or unlink in it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), KeyError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir, "syncing the directory"))
}

/// Writes `bytes` to `path` atomically: a 0600 temp file beside it, fsync,
/// rename over `path`, fsync the directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    write_atomic_then(path, bytes, || Ok(()))
}

/// The temp file [`write_atomic`] writes beside `path`.
pub(crate) fn tmp_path(path: &Path) -> std::path::PathBuf {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    path.with_file_name(tmp_name)
}

/// [`write_atomic`], running `before_rename` once the new content is durable
/// in the temp file and before it replaces `path` (a delete zeroes the old
/// file there: a crash then leaves zeros plus a complete temp file, which
/// the loader finishes renaming).
pub(crate) fn write_atomic_then(
    path: &Path,
    bytes: &[u8],
    before_rename: impl FnOnce() -> Result<(), KeyError>,
) -> Result<(), KeyError> {
    let tmp = tmp_path(path);
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp, "creating a temporary file"))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io(&tmp, "writing a temporary file"))?;
    drop(f);
    before_rename()?;
    fs::rename(&tmp, path).map_err(io(path, "renaming the temporary file into place"))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Overwrites a file's current contents with zeros in place and syncs, so
/// the old bytes are not left in its blocks once it is replaced or removed
/// (on a copy-on-write file system or an SSD this is best effort; the
/// docs say so). A missing file is fine.
pub(crate) fn overwrite_zeros(path: &Path) -> Result<(), KeyError> {
    let mut f = match OpenOptions::new().write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(path, "opening the file to destroy it")(e)),
    };
    let len = f
        .metadata()
        .map_err(io(path, "reading the file's size"))?
        .len();
    let zeros = vec![0u8; usize::try_from(len).unwrap_or(0)];
    f.write_all(&zeros)
        .and_then(|()| f.sync_all())
        .map_err(io(path, "overwriting the file"))
}
