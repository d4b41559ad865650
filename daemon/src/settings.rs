//! Reading a binary's settings: each has an environment variable (`LB_*`, `REGISTRAR_*`), a
//! matching `--flag`, a default and a help line. Flags win over the environment; every invalid
//! value is collected so all of them are reported at once.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

/// One setting: (env name, default, help).
pub type Setting = (&'static str, &'static str, &'static str);

/// A lookup over `--flag value` / `--flag=value` arguments, then the environment. `prefix` is
/// the env prefix (`LB_`): `--connect-timeout` is `LB_CONNECT_TIMEOUT`.
pub fn lookup_from_args_and_env(
    prefix: &str,
    settings: &[Setting],
    args: &[String],
) -> Result<impl Fn(&str) -> Option<String>, String> {
    let mut flags = HashMap::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let Some(flag) = arg.strip_prefix("--") else {
            return Err(format!("  unexpected argument {arg:?}"));
        };
        let (name, value) = match flag.split_once('=') {
            Some((n, v)) => (n.to_string(), v.to_string()),
            None => {
                let v = it
                    .next()
                    .ok_or_else(|| format!("  --{flag} needs a value"))?;
                (flag.to_string(), v.clone())
            }
        };
        let env = format!("{prefix}{}", name.replace('-', "_").to_ascii_uppercase());
        if !settings.iter().any(|(n, _, _)| *n == env) {
            return Err(format!("  unknown flag --{name} (see --help)"));
        }
        flags.insert(env, value);
    }
    Ok(move |name: &str| {
        flags
            .get(name)
            .cloned()
            .or_else(|| std::env::var(name).ok())
    })
}

/// The `--help` text listing every setting with its flag, default and meaning.
pub fn help(title: &str, prefix: &str, settings: &[Setting]) -> String {
    let mut out =
        format!("{title}\n\nEvery setting is a flag or an environment variable (flags win):\n\n");
    for (env, default, help) in settings {
        let flag = env
            .trim_start_matches(prefix)
            .to_ascii_lowercase()
            .replace('_', "-");
        let _ = writeln!(
            out,
            "  --{flag:<24} {env:<32} default {default:?}\n      {help}"
        );
    }
    out
}

/// Reads typed settings through a lookup, falling back to defaults and collecting errors.
pub struct Reader<'a, F> {
    lookup: F,
    settings: &'a [Setting],
    errors: String,
}

impl<'a, F: Fn(&str) -> Option<String>> Reader<'a, F> {
    pub fn new(settings: &'a [Setting], lookup: F) -> Self {
        Reader {
            lookup,
            settings,
            errors: String::new(),
        }
    }

    fn default_of(&self, name: &str) -> &'static str {
        self.settings
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, d, _)| *d)
            .expect("every setting read is declared")
    }

    /// The raw value, trying `alias` (e.g. `CONSUL_HTTP_ADDR`) before the default.
    pub fn raw(&mut self, name: &str, alias: Option<&str>) -> String {
        (self.lookup)(name)
            .or_else(|| alias.and_then(|a| (self.lookup)(a)))
            .unwrap_or_else(|| self.default_of(name).to_string())
    }

    /// The raw value when it is not empty.
    pub fn optional(&mut self, name: &str, alias: Option<&str>) -> Option<String> {
        Some(self.raw(name, alias)).filter(|v| !v.is_empty())
    }

    /// A parsed value; an unparsable one is recorded as an error and the default is used.
    pub fn get<T>(&mut self, name: &str, parse: impl Fn(&str) -> Option<T>, expected: &str) -> T {
        let default = self.default_of(name);
        if let Some(v) = (self.lookup)(name) {
            if let Some(parsed) = parse(v.trim()) {
                return parsed;
            }
            let _ = writeln!(self.errors, "  {name}={v:?}: expected {expected}");
        }
        parse(default).expect("defaults parse")
    }

    pub fn error(&mut self, line: String) {
        let _ = writeln!(self.errors, "  {line}");
    }

    /// Every error recorded, or `Ok` when there were none.
    pub fn finish(self) -> Result<(), String> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(self.errors)
        }
    }
}

pub fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "true" | "1" | "yes" => Some(true),
        "false" | "0" | "no" => Some(false),
        _ => None,
    }
}

pub fn positive_duration(s: &str) -> Option<Duration> {
    parse_duration(s).filter(|d| !d.is_zero())
}

/// `250ms`, `2s`, `1m`, `1h`, or a bare number of seconds (Consul's duration style).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    (0.0..1e9)
        .contains(&secs)
        .then(|| Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: &[Setting] = &[("X_A", "1s", "a"), ("X_B", "true", "b")];

    #[test]
    fn durations() {
        let cases = [
            ("250ms", Some(Duration::from_millis(250))),
            ("2s", Some(Duration::from_secs(2))),
            ("3", Some(Duration::from_secs(3))),
            ("1.5s", Some(Duration::from_millis(1500))),
            ("1m", Some(Duration::from_secs(60))),
            ("s", None),
            ("-1s", None),
            ("2 days", None),
        ];
        for (raw, want) in cases {
            assert_eq!(parse_duration(raw), want, "{raw}");
        }
    }

    #[test]
    fn flags_win_and_errors_collect() {
        let args: Vec<String> = ["--a", "5s", "--b=nope"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let lookup = lookup_from_args_and_env("X_", S, &args).unwrap();
        let mut r = Reader::new(S, lookup);
        assert_eq!(
            r.get("X_A", parse_duration, "a duration"),
            Duration::from_secs(5)
        );
        assert!(
            r.get("X_B", parse_bool, "a bool"),
            "falls back to the default"
        );
        let err = r.finish().unwrap_err();
        assert!(err.contains("X_B=\"nope\""), "{err}");
        assert!(lookup_from_args_and_env("X_", S, &["--c=1".into()]).is_err());
        assert!(lookup_from_args_and_env("X_", S, &["--a".into()]).is_err());
    }

    #[test]
    fn help_lists_every_setting() {
        let h = help("x", "X_", S);
        assert!(h.contains("--a") && h.contains("X_B"));
    }
}
