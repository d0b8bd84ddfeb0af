//! Finding a checkpoint on disk: a local directory, or a hub repo id resolved through the
//! local Hugging Face cache (`HF_HUB_CACHE`, `HF_HOME/hub`, `~/.cache/huggingface/hub`).
//! Nothing is downloaded: a missing repo is an error that says what to fetch.

use std::path::{Path, PathBuf};

use crate::CheckpointError;

/// The hub cache directory, honouring the same variables as `huggingface_hub`.
pub fn hub_cache_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p).join("hub"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}

/// A resolved location: the directory holding `config.json`, and the name the reference
/// would derive from it (`get_model_name_from_path`), used to pick the template.
#[derive(Debug, Clone)]
pub struct Located {
    pub dir: PathBuf,
    pub name: String,
}

/// `model` is a path, or an `org/name` repo id looked up in the hub cache.
pub fn locate(model: &str) -> Result<Located, CheckpointError> {
    let path = Path::new(model);
    if path.is_dir() {
        return Ok(Located {
            dir: path.to_path_buf(),
            name: model_name_from_path(path),
        });
    }
    if path.exists() {
        return Err(CheckpointError::NotADirectory {
            path: model.to_string(),
        });
    }
    if looks_like_repo_id(model) {
        if let Some(dir) = hub_snapshot(model) {
            let name = model.rsplit('/').next().unwrap_or(model).to_string();
            return Ok(Located { dir, name });
        }
        return Err(CheckpointError::NotDownloaded {
            repo: model.to_string(),
            cache: hub_cache_dir()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "~/.cache/huggingface/hub".into()),
        });
    }
    Err(CheckpointError::MissingDir {
        path: model.to_string(),
    })
}

fn looks_like_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
        && !s.starts_with('.')
}

/// `models--org--name/snapshots/<refs/main>`, or the only snapshot when `refs/main` is absent.
pub fn hub_snapshot(repo: &str) -> Option<PathBuf> {
    let root = hub_cache_dir()?.join(format!("models--{}", repo.replace('/', "--")));
    let snapshots = root.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(root.join("refs/main")) {
        let dir = snapshots.join(rev.trim());
        if dir.is_dir() {
            return Some(dir);
        }
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    if dirs.len() == 1 {
        dirs.pop()
    } else {
        None
    }
}

/// LLaVA's `get_model_name_from_path`: the last component, or `parent_checkpoint-N` for a
/// trainer's `checkpoint-N` directory.
pub fn model_name_from_path(path: &Path) -> String {
    // The path as typed, as Python splits the string: a symlink to a hub snapshot keeps its
    // readable name. Only paths without a usable last component (`.`, `..`, a bare
    // `checkpoint-N`) are resolved.
    let typed_ok = path.file_name().is_some()
        && !(path
            .file_name()
            .is_some_and(|f| f.to_string_lossy().starts_with("checkpoint-"))
            && path.parent().and_then(Path::file_name).is_none());
    let canonical = if typed_ok {
        path.to_path_buf()
    } else {
        path.canonicalize().unwrap_or_else(|_| path.to_path_buf())
    };
    let last = canonical
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if last.starts_with("checkpoint-") {
        if let Some(parent) = canonical.parent().and_then(Path::file_name) {
            return format!("{}_{last}", parent.to_string_lossy());
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trainer_checkpoint_dirs_take_their_parent_name() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("llava-v1.5-7b-lora/checkpoint-500");
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(
            model_name_from_path(&dir),
            "llava-v1.5-7b-lora_checkpoint-500"
        );
    }

    #[test]
    fn repo_ids_resolve_through_the_hub_cache_refs() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("models--tabtoyou--KoLLaVA-KoVicuna-7b");
        std::fs::create_dir_all(root.join("snapshots/abc123")).unwrap();
        std::fs::create_dir_all(root.join("refs")).unwrap();
        std::fs::write(root.join("refs/main"), "abc123\n").unwrap();
        // SAFETY-free: tests in this module do not run other env-dependent code concurrently.
        std::env::set_var("HF_HUB_CACHE", tmp.path());
        let got = locate("tabtoyou/KoLLaVA-KoVicuna-7b").unwrap();
        assert_eq!(got.dir, root.join("snapshots/abc123"));
        assert_eq!(got.name, "KoLLaVA-KoVicuna-7b");
        let err = locate("openai/clip-vit-large-patch14")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("openai/clip-vit-large-patch14") && err.contains("download"),
            "{err}"
        );
        std::env::remove_var("HF_HUB_CACHE");
    }
}
