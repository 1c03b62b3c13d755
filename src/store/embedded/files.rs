//! The data directory and the database file, for their owner only: queued mutations hold the
//! app's credentials (module docs of [`super`], "At rest").

use std::path::Path;

use crate::store::StoreError;

/// Create `dir` (and missing parents) for the owner only (0700), and take group and other
/// access away from an existing one: queued mutations hold the app's credentials.
pub(super) fn private_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| StoreError::Embedded(format!("create {}: {e}", dir.display())))?;
    owner_only(dir, 0o700);
    Ok(())
}

/// Create the database file for the owner only (0600) before redb opens it (redb initialises
/// an empty file), and tighten an existing one.
pub(super) fn private_file(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => owner_only(path, 0o600),
        Err(e) => {
            return Err(StoreError::Embedded(format!(
                "create {}: {e}",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Set `mode` on `path` when group or others have access (warning: it was so, or cannot be
/// changed).
fn owner_only(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    if meta.permissions().mode() & 0o077 == 0 {
        return;
    }
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
        Ok(()) => tracing::warn!(
            "{} was open to group or others; now {mode:o} (it holds queued credentials)",
            path.display()
        ),
        Err(e) => tracing::warn!(
            "{} is open to group or others and cannot be restricted: {e}",
            path.display()
        ),
    }
}
