//! The CLI's policy documents: reading a file (TOML or JSON), writing TOML,
//! and `netd policy set KEY=VALUE...` edits. Pure: the CLI reads and writes
//! the document through the control API.
//!
//! `set` keys (an empty value unsets or removes):
//! * `default=allow|deny`
//! * `stacks.NAME.within_stack|within_service|ingress=allow|deny|`
//! * `stacks.NAME.linked=a,b` (any edit of `stacks.NAME.*` declares the
//!   stack, so `stacks.NAME.linked=` declares one with nothing set)
//! * `stacks.NAME=` removes the stack
//! * `rules.NAME.from=SELECTOR`, `rules.NAME.to=SELECTOR`,
//!   `rules.NAME.ports=tcp/80,udp/53` (empty: every port); a new rule goes
//!   last and needs both `from` and `to` in the same command
//! * `rules.NAME=` removes the rule

use std::path::Path;

use weft_model::{Action, Policy, PolicyError, PortSpec, Rule, Selector};

/// What is wrong with a file or a `set` argument.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("{arg:?}: {reason}")]
    Syntax { arg: String, reason: String },
    #[error("{arg:?}: {source}")]
    Value {
        arg: String,
        #[source]
        source: PolicyError,
    },
    #[error(
        "rule {name:?} is new: give both rules.{name}.from=... and rules.{name}.to=... \
         (selectors: *, stack or stack/service)"
    )]
    IncompleteRule { name: String },
    #[error("{file}: not a policy document in {format}: {detail}")]
    File {
        file: String,
        format: &'static str,
        detail: String,
    },
    #[error("{0}")]
    Invalid(#[from] PolicyError),
}

/// Reads a policy document: JSON for `*.json` (or text starting with `{`),
/// TOML otherwise; validated.
pub fn parse_file(name: &Path, text: &str) -> Result<Policy, EditError> {
    let ext = name.extension().and_then(|e| e.to_str());
    let json = ext == Some("json") || (ext != Some("toml") && text.trim_start().starts_with('{'));
    let file = name.display().to_string();
    let policy: Policy = if json {
        serde_json::from_str(text).map_err(|e| EditError::File {
            file,
            format: "JSON",
            detail: e.to_string(),
        })?
    } else {
        toml::from_str(text).map_err(|e| EditError::File {
            file,
            format: "TOML",
            detail: e.to_string().trim_end().to_owned(),
        })?
    };
    policy.validate()?;
    Ok(policy)
}

/// The document as TOML (what `netd policy get` prints and `apply` reads).
pub fn to_toml(policy: &Policy) -> String {
    // A policy is strings, lists and tables only: TOML can always hold it.
    toml::to_string(policy).unwrap_or_else(|e| format!("# cannot render as TOML: {e}\n"))
}

const STACK_FIELDS: [&str; 4] = ["within_stack", "within_service", "ingress", "linked"];

/// A new rule being built from `rules.NAME.*` edits.
struct NewRule {
    name: String,
    from: Option<Selector>,
    to: Option<Selector>,
    ports: Vec<PortSpec>,
}

/// Applies `KEY=VALUE` edits in order (see the module docs), then
/// validates the result.
pub fn apply_set(policy: &mut Policy, args: &[String]) -> Result<(), EditError> {
    let mut new_rules: Vec<NewRule> = Vec::new();
    for arg in args {
        let syntax = |reason: String| EditError::Syntax {
            arg: arg.clone(),
            reason,
        };
        let value_err = |source| EditError::Value {
            arg: arg.clone(),
            source,
        };
        let (key, value) = arg
            .split_once('=')
            .ok_or_else(|| syntax("write KEY=VALUE, e.g. default=deny".into()))?;
        let (key, value) = (key.trim(), value.trim());
        let action = |v: &str| -> Result<Option<Action>, EditError> {
            if v.is_empty() {
                Ok(None)
            } else {
                v.parse().map(Some).map_err(value_err)
            }
        };
        if key == "default" {
            policy.default = action(value)?.ok_or_else(|| syntax("use allow or deny".into()))?;
        } else if let Some(rest) = key.strip_prefix("stacks.") {
            let (stack, field) = match rest.rsplit_once('.') {
                Some((stack, field)) if STACK_FIELDS.contains(&field) => (stack, Some(field)),
                _ => (rest, None),
            };
            if stack.is_empty() {
                return Err(syntax("no stack name".into()));
            }
            let Some(field) = field else {
                if !value.is_empty() {
                    return Err(syntax(format!(
                        "stacks.{stack}= (empty) removes the stack; to set something, use \
                         stacks.{stack}.FIELD with FIELD one of {}",
                        STACK_FIELDS.join(", ")
                    )));
                }
                policy.stacks.remove(stack);
                continue;
            };
            let sp = policy.stacks.entry(stack.to_owned()).or_default();
            match field {
                "within_stack" => sp.within_stack = action(value)?,
                "within_service" => sp.within_service = action(value)?,
                "ingress" => sp.ingress = action(value)?,
                _ => sp.linked = list(value).map(str::to_owned).collect(),
            }
        } else if let Some(rest) = key.strip_prefix("rules.") {
            let (name, field) = match rest.split_once('.') {
                Some((name, field)) => (name, Some(field)),
                None => (rest, None),
            };
            let Some(field) = field else {
                if !value.is_empty() {
                    return Err(syntax(format!(
                        "rules.{name}= (empty) removes the rule; to set something, use \
                         rules.{name}.from, .to or .ports"
                    )));
                }
                policy.rules.retain(|r| r.name != name);
                new_rules.retain(|r| r.name != name);
                continue;
            };
            let selector = |v: &str| v.parse::<Selector>().map_err(value_err);
            let ports = |v: &str| -> Result<Vec<PortSpec>, EditError> {
                list(v).map(|p| p.parse().map_err(value_err)).collect()
            };
            if let Some(rule) = policy.rules.iter_mut().find(|r| r.name == name) {
                match field {
                    "from" => rule.from = selector(value)?,
                    "to" => rule.to = selector(value)?,
                    "ports" => rule.ports = ports(value)?,
                    _ => return Err(syntax(rule_fields())),
                }
                continue;
            }
            let pos = match new_rules.iter().position(|r| r.name == name) {
                Some(pos) => pos,
                None => {
                    new_rules.push(NewRule {
                        name: name.to_owned(),
                        from: None,
                        to: None,
                        ports: Vec::new(),
                    });
                    new_rules.len() - 1
                }
            };
            let rule = &mut new_rules[pos];
            match field {
                "from" => rule.from = Some(selector(value)?),
                "to" => rule.to = Some(selector(value)?),
                "ports" => rule.ports = ports(value)?,
                _ => return Err(syntax(rule_fields())),
            }
        } else {
            return Err(syntax(
                "unknown key: use default, stacks.NAME.FIELD or rules.NAME.FIELD".into(),
            ));
        }
    }
    for r in new_rules {
        match (r.from, r.to) {
            (Some(from), Some(to)) => policy.rules.push(Rule {
                name: r.name,
                from,
                to,
                ports: r.ports,
            }),
            _ => return Err(EditError::IncompleteRule { name: r.name }),
        }
    }
    policy.validate()?;
    Ok(())
}

fn rule_fields() -> String {
    "a rule's fields are from, to and ports".into()
}

/// The items of a comma-separated list, trimmed, empty ones dropped.
fn list(v: &str) -> impl Iterator<Item = &str> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_model::StackPolicy;

    fn set(policy: &mut Policy, args: &[&str]) -> Result<(), EditError> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        apply_set(policy, &args)
    }

    #[test]
    fn set_edits_every_kind_of_key() {
        let mut p = Policy::default();
        set(
            &mut p,
            &[
                "default=deny",
                "stacks.shop.within_stack=allow",
                "stacks.shop.linked=pay, ops",
                "stacks.pay.linked=",
                "stacks.ops.ingress=deny",
                "rules.web-api.from=shop/web",
                "rules.web-api.to=api",
                "rules.web-api.ports=tcp/80,udp/53",
                "rules.ops-all.to=*",
                "rules.ops-all.from=ops",
            ],
        )
        .unwrap();
        assert_eq!(p.default, Action::Deny);
        assert_eq!(p.stacks["shop"].within_stack, Some(Action::Allow));
        assert_eq!(p.stacks["shop"].linked, ["pay", "ops"]);
        assert_eq!(p.stacks["pay"], StackPolicy::default());
        assert_eq!(p.stacks["ops"].ingress, Some(Action::Deny));
        assert_eq!(p.rules.len(), 2);
        assert_eq!(p.rules[0].name, "web-api");
        assert_eq!(p.rules[0].ports.len(), 2);
        assert_eq!(p.rules[1].from, Selector::Stack("ops".into()));
        assert_eq!(p.rules[1].to, Selector::Any);

        // Existing rules are edited in place; empty values unset and remove.
        set(
            &mut p,
            &[
                "rules.web-api.ports=",
                "stacks.shop.within_stack=",
                "stacks.shop.linked=ops",
                "stacks.pay=",
                "rules.ops-all=",
            ],
        )
        .unwrap();
        assert!(p.rules[0].ports.is_empty());
        assert_eq!(p.rules.len(), 1);
        assert_eq!(p.stacks["shop"].within_stack, None);
        assert!(!p.stacks.contains_key("pay"));
    }

    #[test]
    fn stack_names_may_have_dots() {
        let mut p = Policy::default();
        set(&mut p, &["stacks.a.b.ingress=deny"]).unwrap();
        assert_eq!(p.stacks["a.b"].ingress, Some(Action::Deny));
        set(&mut p, &["stacks.a.b="]).unwrap();
        assert!(p.stacks.is_empty());
    }

    #[test]
    fn bad_edits_say_what_is_wrong() {
        let cases: &[(&[&str], &str)] = &[
            (&["default"], "KEY=VALUE"),
            (&["default=maybe"], "use allow or deny"),
            (&["default="], "use allow or deny"),
            (&["colour=red"], "unknown key"),
            (&["stacks.shop=deny"], "removes the stack"),
            (&["stacks.shop.linked=nowhere"], "not a stack of the policy"),
            (&["rules.x.from=a"], "give both rules.x.from"),
            (
                &["rules.x.from=a", "rules.x.to=b", "rules.x.ports=tcp/0"],
                "port 0",
            ),
            (&["rules.x.from=a b"], "invalid selector"),
            (&["rules.x.colour=a"], "from, to and ports"),
            (&["rules.Bad.from=a", "rules.Bad.to=b"], "invalid rule name"),
        ];
        for (args, says) in cases {
            let mut p = Policy::default();
            let err = set(&mut p, args).unwrap_err().to_string();
            assert!(err.contains(says), "{args:?}: wanted {says:?} in {err}");
        }
    }

    #[test]
    fn files_in_toml_and_json_round_trip() {
        let toml_text = "default = \"deny\"\n\n[stacks.shop]\nwithin_stack = \"allow\"\n\n\
                         [[rules]]\nname = \"a\"\nfrom = \"*\"\nto = \"shop/web\"\nports = [\"tcp/80\"]\n";
        let p = parse_file(Path::new("p.toml"), toml_text).unwrap();
        assert_eq!(p.default, Action::Deny);
        assert_eq!(parse_file(Path::new("p.toml"), &to_toml(&p)).unwrap(), p);
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(parse_file(Path::new("p.json"), &json).unwrap(), p);
        // No extension: JSON if it looks like JSON.
        assert_eq!(parse_file(Path::new("-"), &json).unwrap(), p);
        assert_eq!(parse_file(Path::new("-"), toml_text).unwrap(), p);

        let err = parse_file(Path::new("p.toml"), "default = \"deny\"\nstray = 1\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("p.toml: not a policy document in TOML") && err.contains("stray"),
            "{err}"
        );
        let err = parse_file(Path::new("p.toml"), "[stacks.a]\nlinked = [\"b\"]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a stack of the policy"), "{err}");
    }
}
