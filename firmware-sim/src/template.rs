//! Name templates: `sensors/{device}/temperature`, `sim-{device}`, `dev-{n}`.
//!
//! Placeholders: `{device}` the device name, `{n}` the 1-based index in the fleet, `{k}` the
//! 1-based index within the device's class, `{class}` the class name, `{run}` the run id.
//! Templates are checked once at start so that a typo fails before any connection is made.

use crate::error::SimError;

/// The values a template can refer to.
#[derive(Debug, Clone, Copy)]
pub struct Names<'a> {
    /// Device name (not available while expanding the device-name template itself).
    pub device: Option<&'a str>,
    /// 1-based index in the fleet.
    pub n: u64,
    /// 1-based index in the class.
    pub k: u64,
    /// Class name.
    pub class: &'a str,
    /// Run id as 8 hex digits.
    pub run: &'a str,
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Device,
    N,
    K,
    Class,
    Run,
}

impl Template {
    /// Parses `text`; `option` names where it came from for error messages. `allow_device` is
    /// false for the device-name template, which cannot refer to itself.
    pub fn parse(option: &str, text: &str, allow_device: bool) -> Result<Self, SimError> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let close = rest[open..].find('}').ok_or_else(|| {
                SimError::invalid(option, format!("template {text:?} has an unclosed '{{'"))
            })? + open;
            let part = match &rest[open + 1..close] {
                "device" if allow_device => Part::Device,
                "n" => Part::N,
                "k" => Part::K,
                "class" => Part::Class,
                "run" => Part::Run,
                other => {
                    let known = if allow_device {
                        "{device}, {n}, {k}, {class}, {run}"
                    } else {
                        "{n}, {k}, {class}, {run}"
                    };
                    return Err(SimError::invalid(
                        option,
                        format!("template {text:?}: unknown placeholder {{{other}}}; use {known}"),
                    ));
                }
            };
            parts.push(part);
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template { parts })
    }

    /// Whether the expansion differs between two devices of the fleet.
    pub fn is_unique_per_device(&self) -> bool {
        self.parts
            .iter()
            .any(|p| matches!(p, Part::Device | Part::N))
    }

    /// Whether the expansion differs between two devices of the same class.
    pub fn is_unique_per_class_member(&self) -> bool {
        self.parts
            .iter()
            .any(|p| matches!(p, Part::Device | Part::N | Part::K))
    }

    /// Expands the template.
    pub fn render(&self, names: &Names<'_>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Device => out.push_str(names.device.unwrap_or_default()),
                Part::N => out.push_str(&names.n.to_string()),
                Part::K => out.push_str(&names.k.to_string()),
                Part::Class => out.push_str(names.class),
                Part::Run => out.push_str(names.run),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Names<'static> {
        Names {
            device: Some("dev-7"),
            n: 7,
            k: 2,
            class: "temp",
            run: "0000abcd",
        }
    }

    #[test]
    fn placeholders_expand() {
        let template = Template::parse("--topic", "sensors/{device}/{class}/{n}-{k}/{run}", true);
        assert_eq!(
            template.unwrap().render(&names()),
            "sensors/dev-7/temp/7-2/0000abcd"
        );
    }

    #[test]
    fn unknown_placeholder_names_the_option() {
        let err = Template::parse("--topic", "sensors/{devices}/t", true).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("--topic:"), "{text}");
        assert!(text.contains("{devices}"), "{text}");
    }

    #[test]
    fn device_name_template_cannot_refer_to_itself() {
        assert!(Template::parse("--device-id", "x-{device}", false).is_err());
    }

    #[test]
    fn unclosed_brace_is_an_error() {
        assert!(Template::parse("--client-id", "sim-{device", true).is_err());
    }

    #[test]
    fn uniqueness_depends_on_placeholders() {
        let constant = Template::parse("--client-id", "sim-{class}", true).unwrap();
        assert!(!constant.is_unique_per_device());
        let per_class = Template::parse("--device-id", "{class}-{k}", false).unwrap();
        assert!(!per_class.is_unique_per_device());
        assert!(per_class.is_unique_per_class_member());
    }
}
