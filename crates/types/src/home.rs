use std::path::PathBuf;

/// tokenfab's data directory (model cache, ledger, calibrated profiles):
/// `$TOKENFAB_HOME`, else `~/.cache/tokenfab`.
pub fn home() -> PathBuf {
    if let Some(h) = std::env::var_os("TOKENFAB_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let base = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    base.join(".cache").join("tokenfab")
}
