//! Hugging Face Hub sources: reuse of the standard Hugging Face cache, then download of
//! `{endpoint}/{repo}/resolve/{revision}/{path}`.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use ureq::config::RedirectAuthHeaders;

use super::cache::PullOptions;
use super::manifest::{HubSource, Manifest, ManifestFile};
use super::staging::StagedFile;
use super::{ProvisionError, PullEvent};

pub(crate) fn fetch(
    options: &PullOptions,
    manifest: &Manifest,
    source: &HubSource,
    missing: &[&ManifestFile],
    dir: &Path,
    progress: &mut dyn FnMut(PullEvent),
) -> Result<(), ProvisionError> {
    let mut agent = None;
    for file in missing {
        let repo_path = source.path_in_repo(&file.name);
        if let Some(hf_cache) = &options.hf_hub_cache {
            if copy_from_hf_cache(hf_cache, manifest, source, file, dir, progress) {
                continue;
            }
        }
        if options.hub_offline {
            return Err(ProvisionError::HubOffline { repo: source.repo.clone(), path: repo_path.to_owned() });
        }
        let agent = agent.get_or_insert_with(|| hub_agent(options));
        download(agent, options, manifest, source, file, dir, progress)?;
    }
    Ok(())
}

fn hub_agent(options: &PullOptions) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(options.connect_timeout))
        .timeout_resolve(Some(options.connect_timeout))
        .timeout_recv_response(Some(options.stall_timeout))
        .timeout_per_read(Some(options.stall_timeout))
        // The hub redirects large files to a CDN with signed URLs, which must not receive
        // the user's token; same-host redirects (renamed repos) still need it.
        .redirect_auth_headers(RedirectAuthHeaders::SameHost)
        // Weights are incompressible; transparent decompression would only make the
        // response length disagree with the file size.
        .accept_encoding("identity")
        .user_agent(concat!("memlora/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

fn download(
    agent: &ureq::Agent,
    options: &PullOptions,
    manifest: &Manifest,
    source: &HubSource,
    file: &ManifestFile,
    dir: &Path,
    progress: &mut dyn FnMut(PullEvent),
) -> Result<(), ProvisionError> {
    let url = format!(
        "{}/{}/resolve/{}/{}",
        options.hub_endpoint.trim_end_matches('/'),
        source.repo,
        percent_encode(&source.revision, false),
        percent_encode(source.path_in_repo(&file.name), true),
    );
    tracing::info!(model = %manifest.name, %url, "downloading");
    let mut request = agent.get(&url);
    if let Some(token) = &options.hub_token {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let mut response = request.call().map_err(|error| ProvisionError::Http { url: url.clone(), reason: error.to_string() })?;
    let status = response.status().as_u16();
    if !(200..300).contains(&status) {
        let hint = match status {
            401 | 403 => " (private or gated repository: set HF_TOKEN or run `huggingface-cli login`)",
            404 => " (no such repository, revision or file)",
            429 => " (rate limited; try again later)",
            _ => "",
        };
        return Err(ProvisionError::HttpStatus { url, status, hint });
    }
    // A size that already disagrees means a different file; don't download it to find out.
    if let (Some(length), Some(expected)) = (response.body().content_length(), file.size) {
        if length != expected {
            return Err(ProvisionError::SizeMismatch { model: manifest.name.clone(), file: file.name.clone(), expected, actual: length });
        }
    }
    let mut staged = StagedFile::create(&manifest.name, file, dir.join(&file.name))?;
    staged.append_from(&mut response.body_mut().as_reader(), &url, progress)?;
    progress(PullEvent::Verifying { file: file.name.clone() });
    staged.commit()
}

/// Copies `file` out of the Hugging Face cache if a snapshot there holds it with the
/// right checksum. Any problem with a candidate only means it cannot be reused.
fn copy_from_hf_cache(
    hf_cache: &Path,
    manifest: &Manifest,
    source: &HubSource,
    file: &ManifestFile,
    dir: &Path,
    progress: &mut dyn FnMut(PullEvent),
) -> bool {
    for candidate in hf_cache_candidates(hf_cache, source, source.path_in_repo(&file.name)) {
        let Ok(metadata) = fs::metadata(&candidate) else {
            continue;
        };
        if !metadata.is_file() || file.size.is_some_and(|size| metadata.len() != size) {
            continue;
        }
        let copied = File::open(&candidate)
            .map_err(|error| ProvisionError::Io { action: "open", path: candidate.clone(), error })
            .and_then(|mut input| {
                let mut staged = StagedFile::create(&manifest.name, file, dir.join(&file.name))?;
                staged.append_from(&mut input, &candidate.display().to_string(), progress)?;
                progress(PullEvent::Verifying { file: file.name.clone() });
                staged.commit()
            });
        match copied {
            Ok(()) => {
                tracing::info!(model = %manifest.name, file = %file.name,
                    from = %candidate.display(), "reused from the Hugging Face cache");
                return true;
            }
            Err(error) => tracing::debug!(candidate = %candidate.display(), %error,
                "Hugging Face cache file not reusable"),
        }
    }
    false
}

/// Snapshot files that may hold `repo_path`, best first: the snapshot that
/// `refs/{revision}` names (or the revision itself, when it is a commit), then the others.
fn hf_cache_candidates(hf_cache: &Path, source: &HubSource, repo_path: &str) -> Vec<PathBuf> {
    let repo_dir = hf_cache.join(format!("models--{}", source.repo.replace('/', "--")));
    let snapshots = repo_dir.join("snapshots");
    let preferred_commit = fs::read_to_string(repo_dir.join("refs").join(&source.revision))
        .ok()
        .map(|commit| commit.trim().to_owned())
        .filter(|commit| !commit.is_empty() && !commit.contains(['/', '\\']) && commit != "..")
        .or_else(|| is_commit_hash(&source.revision).then(|| source.revision.clone()));
    let mut commits: Vec<String> = fs::read_dir(&snapshots)
        .map(|entries| entries.filter_map(Result::ok).filter_map(|entry| entry.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    commits.sort();
    if let Some(preferred) = preferred_commit {
        commits.retain(|commit| *commit != preferred);
        commits.insert(0, preferred);
    }
    commits.iter().map(|commit| snapshots.join(commit).join(repo_path)).collect()
}

fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|byte| byte.is_ascii_hexdigit())
}

/// Percent-encodes everything but RFC 3986 unreserved characters (and '/' when
/// `keep_slashes`), as the hub client does for revisions and file paths.
fn percent_encode(text: &str, keep_slashes: bool) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') || (keep_slashes && byte == b'/') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::percent_encode;

    #[test]
    fn percent_encoding_matches_the_hub_client() {
        assert_eq!(percent_encode("refs/pr/1", false), "refs%2Fpr%2F1");
        assert_eq!(percent_encode("dir/a b+c.gguf", true), "dir/a%20b%2Bc.gguf");
    }
}
