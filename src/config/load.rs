//! Layering: the TOML file first, then `HALFGUARD__SECTION__KEY` environment variables.
//!
//! Environment overrides exist for Kubernetes and Docker, where changing one clock is easier
//! as an env entry than as a new ConfigMap. The environment is passed in as a map so tests
//! never touch the process environment (`set_var` races in multi-threaded tests).

use std::collections::HashMap;
use std::path::Path;

use config::{Environment, File, FileFormat};

use super::{ADMIN_TOKEN_ENV, AdminToken, Config, ConfigError, RawConfig, TokenSource};

/// Environment variables that override the file start with this prefix...
pub const ENV_PREFIX: &str = "HALFGUARD";
/// ...and use this between prefix, section and key: `HALFGUARD__TIMEOUTS__FIRST_BYTE=2s`.
pub const ENV_SEPARATOR: &str = "__";

/// Loads `path` with overrides (and the admin token) from the process environment.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let env: HashMap<String, String> = std::env::vars()
        .filter(|(k, _)| {
            k.starts_with(&format!("{ENV_PREFIX}{ENV_SEPARATOR}")) || k == ADMIN_TOKEN_ENV
        })
        .collect();
    load_with_env(path, env)
}

/// Loads `path` with overrides taken from `env` instead of the process environment.
pub fn load_with_env(path: &Path, env: HashMap<String, String>) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    // Read the file ourselves: the `config` crate's own lookup guesses extensions and would
    // accept a missing file silently when told it is optional.
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Load {
        file: file.clone(),
        source: config::ConfigError::Message(format!("cannot read the file: {e}")),
    })?;
    parse(&text, &file, env)
}

/// Parses TOML `text` (named `origin` in messages) with overrides from `env`, and reads the
/// admin token from `env` or `admin.token_file`.
pub fn parse(
    text: &str,
    origin: &str,
    mut env: HashMap<String, String>,
) -> Result<Config, ConfigError> {
    let env_token = env.remove(ADMIN_TOKEN_ENV).filter(|t| !t.is_empty());
    let overrides = overrides(&env);
    if let Some((var, key)) = overrides.iter().find(|(_, key)| {
        TABLE_LISTS
            .iter()
            .any(|t| key.split('.').next() == Some(*t))
    }) {
        let list = key.split('.').next().unwrap_or_default();
        return Err(ConfigError::Env {
            var: var.clone(),
            key: key.clone(),
            reason: format!(
                "[[{list}]] is a list of tables and cannot be set from the environment; \
                 set it in the file"
            ),
        });
    }
    let blame = |e: ConfigError| blame_env(e, &overrides);
    let envsrc = Environment::with_prefix(ENV_PREFIX)
        .prefix_separator(ENV_SEPARATOR)
        .separator(ENV_SEPARATOR)
        .try_parsing(true)
        .list_separator(",")
        .with_list_parse_key("limits.allow")
        .with_list_parse_key("limits.deny")
        .ignore_empty(true)
        .source(Some(env.into_iter().collect()));
    let raw: RawConfig = config::Config::builder()
        .add_source(File::from_str(text, FileFormat::Toml))
        .add_source(envsrc)
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| blame(describe(e, origin)))?;
    let mut config = Config::from_raw(raw, origin).map_err(blame)?;
    if let Some(c) = &mut config.cluster
        && c.node.is_empty()
    {
        c.node = super::host_name().ok_or_else(|| ConfigError::Invalid {
            file: origin.to_string(),
            key: "cluster.node".into(),
            reason: "cannot read this host's name; set cluster.node".into(),
        })?;
        super::check_node(&c.node).map_err(|r| ConfigError::Invalid {
            file: origin.to_string(),
            key: "cluster.node".into(),
            reason: format!("the host name {r}; set cluster.node"),
        })?;
    }
    let invalid = |key: &str, reason: String| ConfigError::Invalid {
        file: origin.to_string(),
        key: key.to_string(),
        reason,
    };
    config.admin.token = match (env_token, &config.admin.token_file) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "admin.token_file",
                format!(
                    "the environment variable {ADMIN_TOKEN_ENV} is set too; give the token one way"
                ),
            ));
        }
        (Some(t), None) => {
            Some(AdminToken::new(&t, TokenSource::Env).map_err(|r| invalid(ADMIN_TOKEN_ENV, r))?)
        }
        (None, Some(path)) => {
            Some(AdminToken::from_file(path, origin).map_err(|r| invalid("admin.token_file", r))?)
        }
        (None, None) => None,
    };
    Ok(config)
}

/// Sections the environment cannot set: each is an array of tables, which a flat
/// `SECTION__KEY` cannot address.
const TABLE_LISTS: [&str; 2] = ["listeners", "backends"];

/// The overrides in `env`: (variable, dotted key), `HALFGUARD__LIMITS__MAX_CONNS` ->
/// `limits.max_conns`. Empty values are ignored by the loader, so they are left out here.
fn overrides(env: &HashMap<String, String>) -> Vec<(String, String)> {
    let prefix = format!("{ENV_PREFIX}{ENV_SEPARATOR}");
    let mut out: Vec<(String, String)> = env
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .filter_map(|(k, _)| {
            let rest = k.strip_prefix(&prefix)?;
            let key = rest
                .split(ENV_SEPARATOR)
                .map(str::to_lowercase)
                .collect::<Vec<_>>()
                .join(".");
            Some((k.clone(), key))
        })
        .collect();
    out.sort();
    out
}

/// An error about a key an environment variable set names that variable, not the file.
fn blame_env(e: ConfigError, overrides: &[(String, String)]) -> ConfigError {
    let ConfigError::Invalid { file, key, reason } = e else {
        return e;
    };
    // `limits.allow[0]` was set by `limits.allow`.
    let bare: String = {
        let mut out = String::with_capacity(key.len());
        let mut depth = 0;
        for c in key.chars() {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                _ if depth == 0 => out.push(c),
                _ => {}
            }
        }
        out
    };
    match overrides
        .iter()
        .find(|(_, k)| *k == bare || bare.starts_with(&format!("{k}.")))
    {
        Some((var, _)) => ConfigError::Env {
            var: var.clone(),
            key,
            reason,
        },
        None => ConfigError::Invalid { file, key, reason },
    }
}

/// Turns the `config` crate's error into one that names the full key, so `halfguard check`
/// prints `listeners[0].limits.frob: unknown key` rather than a serde sentence.
fn describe(e: config::ConfigError, file: &str) -> ConfigError {
    let invalid = |key: String, reason: String| ConfigError::Invalid {
        file: file.to_string(),
        key,
        reason,
    };
    match e {
        config::ConfigError::At {
            error,
            key: Some(key),
            ..
        } => match *error {
            config::ConfigError::Message(m) => match unknown_field(&m) {
                Some((field, rest)) => invalid(join_key(&key, field), format!("unknown key{rest}")),
                None => invalid(dotted(&key), m),
            },
            other => invalid(dotted(&key), other.to_string()),
        },
        config::ConfigError::Type {
            unexpected,
            expected,
            key: Some(key),
            ..
        } => invalid(
            dotted(&key),
            format!("invalid type: {unexpected}, expected {expected}"),
        ),
        config::ConfigError::Message(m) => match unknown_field(&m) {
            Some((field, rest)) => invalid(field.to_string(), format!("unknown key{rest}")),
            None => ConfigError::Load {
                file: file.to_string(),
                source: config::ConfigError::Message(m),
            },
        },
        other => ConfigError::Load {
            file: file.to_string(),
            source: other,
        },
    }
}

/// Splits serde's "unknown field `x`, expected one of ..." into the field and the rest.
fn unknown_field(m: &str) -> Option<(&str, &str)> {
    let rest = m.strip_prefix("unknown field `")?;
    let (field, rest) = rest.split_once('`')?;
    Some((field, rest))
}

/// `listeners[0]limits` (as the `config` crate writes nested keys) -> `listeners[0].limits`.
fn dotted(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 2);
    let mut prev = ' ';
    for c in key.chars() {
        if prev == ']' && c != '.' && c != '[' {
            out.push('.');
        }
        out.push(c);
        prev = c;
    }
    out
}

fn join_key(parent: &str, field: &str) -> String {
    if parent.is_empty() {
        field.to_string()
    } else {
        format!("{}.{field}", dotted(parent))
    }
}
