//! The Helm template functions Weft's charts use, over gtmpl's values. Each behaves as Helm's (sprig's)
//! does for the arguments the charts pass; the chart tests render every profile with the real `helm`
//! and compare, so a function that drifts from Helm's fails there.

use std::{cell::RefCell, collections::HashMap};

use gtmpl_ng::{Context, Func, FuncError, Template, Value};

thread_local! {
    /// The `define`s of the chart being rendered, for `include`: gtmpl's functions are plain `fn`s,
    /// so the chart's helpers reach them through here. Set for the length of one render.
    static HELPERS: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Runs `f` with `helpers` as the text `include` finds its templates in.
pub(crate) fn with_helpers<T>(helpers: &str, f: impl FnOnce() -> T) -> T {
    let previous = HELPERS.with(|h| h.replace(helpers.to_string()));
    let result = f();
    HELPERS.with(|h| *h.borrow_mut() = previous);
    result
}

pub(crate) const FUNCS: &[(&str, Func)] = &[
    ("include", include),
    ("toYaml", to_yaml),
    ("fromYaml", from_yaml),
    ("toJson", to_json),
    ("nindent", nindent),
    ("indent", indent),
    ("quote", quote),
    ("default", default),
    ("dict", dict),
    ("list", list),
    ("has", has),
    ("hasKey", has_key),
    ("fail", fail),
    ("required", required),
    ("deepCopy", deep_copy),
    ("omit", omit),
    ("mergeOverwrite", merge_overwrite),
    ("trimSuffix", trim_suffix),
    ("int", int),
    ("empty", empty),
    ("toString", to_string),
    ("contains", contains),
    ("ternary", ternary),
];

pub(crate) fn template(name: &str) -> Template {
    let mut t = Template::with_name(name);
    t.add_funcs(FUNCS);
    t
}

fn generic(message: impl Into<String>) -> FuncError {
    FuncError::Generic(message.into())
}

fn arg<'a>(name: &str, args: &'a [Value], i: usize) -> Result<&'a Value, FuncError> {
    args.get(i)
        .ok_or_else(|| FuncError::AtLeastXArgs(name.into(), i + 1))
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::NoValue | Value::Nil => String::new(),
        other => other.to_string(),
    }
}

fn count(name: &str, v: &Value) -> Result<usize, FuncError> {
    match v {
        Value::Number(n) => n
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| generic(format!("{name}: {n} is not a count"))),
        other => Err(generic(format!("{name}: {other} is not a number"))),
    }
}

/// gtmpl's value as JSON: what YAML, JSON and merging work on.
pub(crate) fn to_json_value(v: &Value) -> serde_json::Value {
    match v {
        Value::NoValue | Value::Nil | Value::Function(_) => serde_json::Value::Null,
        Value::Bool(b) => (*b).into(),
        Value::String(s) => s.clone().into(),
        Value::Object(m) | Value::Map(m) => serde_json::Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), to_json_value(v)))
                .collect(),
        ),
        Value::Array(a) => a.iter().map(to_json_value).collect(),
        Value::Number(n) => n
            .as_i64()
            .map(serde_json::Value::from)
            .or_else(|| n.as_u64().map(serde_json::Value::from))
            .or_else(|| n.as_f64().map(serde_json::Value::from))
            .unwrap_or(serde_json::Value::Null),
    }
}

pub(crate) fn from_json_value(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::Nil,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => n
            .as_i64()
            .map(Value::from)
            .or_else(|| n.as_u64().map(Value::from))
            .or_else(|| n.as_f64().map(Value::from))
            .unwrap_or(Value::Nil),
        serde_json::Value::String(s) => Value::String(s.clone()),
        serde_json::Value::Array(a) => Value::Array(a.iter().map(from_json_value).collect()),
        serde_json::Value::Object(m) => Value::Map(
            m.iter()
                .map(|(k, v)| (k.clone(), from_json_value(v)))
                .collect(),
        ),
    }
}

/// YAML as Helm's `toYaml` writes it: block style, no trailing newline.
pub(crate) fn yaml_text(v: &serde_json::Value) -> Result<String, String> {
    let text = serde_saphyr::to_string(v).map_err(|e| e.to_string())?;
    Ok(text.trim_end_matches('\n').to_string())
}

fn include(args: &[Value]) -> Result<Value, FuncError> {
    let name = text(arg("include", args, 0)?);
    let context = args.get(1).cloned().unwrap_or(Value::Nil);
    let helpers = HELPERS.with(|h| h.borrow().clone());
    let mut t = template("weft-charts-helpers");
    t.parse(helpers).map_err(|e| generic(e.to_string()))?;
    if !t.tree_set.contains_key(&name) {
        return Err(generic(format!("include: no template named {name:?}")));
    }
    t.name = name;
    t.render(&Context::from(context))
        .map(Value::String)
        .map_err(|e| generic(e.to_string()))
}

fn to_yaml(args: &[Value]) -> Result<Value, FuncError> {
    yaml_text(&to_json_value(arg("toYaml", args, 0)?))
        .map(Value::String)
        .map_err(generic)
}

fn from_yaml(args: &[Value]) -> Result<Value, FuncError> {
    let source = text(arg("fromYaml", args, 0)?);
    if source.trim().is_empty() {
        return Ok(Value::Map(HashMap::new()));
    }
    let parsed: serde_json::Value =
        serde_saphyr::from_str(&source).map_err(|e| generic(format!("fromYaml: {e}")))?;
    Ok(from_json_value(&parsed))
}

fn to_json(args: &[Value]) -> Result<Value, FuncError> {
    serde_json::to_string(&to_json_value(arg("toJson", args, 0)?))
        .map(Value::String)
        .map_err(|e| generic(e.to_string()))
}

fn indent_lines(n: usize, s: &str) -> String {
    let pad = " ".repeat(n);
    s.split('\n')
        .map(|l| format!("{pad}{l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn nindent(args: &[Value]) -> Result<Value, FuncError> {
    let n = count("nindent", arg("nindent", args, 0)?)?;
    Ok(Value::String(format!(
        "\n{}",
        indent_lines(n, &text(arg("nindent", args, 1)?))
    )))
}

fn indent(args: &[Value]) -> Result<Value, FuncError> {
    let n = count("indent", arg("indent", args, 0)?)?;
    Ok(Value::String(indent_lines(
        n,
        &text(arg("indent", args, 1)?),
    )))
}

fn quote(args: &[Value]) -> Result<Value, FuncError> {
    let quoted: Vec<String> = args
        .iter()
        .filter(|v| !matches!(v, Value::Nil | Value::NoValue))
        .map(|v| serde_json::Value::String(text(v)).to_string())
        .collect();
    Ok(Value::String(quoted.join(" ")))
}

/// Sprig's emptiness: nil, false, 0, "", and empty collections.
fn is_empty(v: &Value) -> bool {
    match v {
        Value::NoValue | Value::Nil => true,
        Value::Bool(b) => !b,
        Value::String(s) => s.is_empty(),
        Value::Object(m) | Value::Map(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::Function(_) => false,
    }
}

fn default(args: &[Value]) -> Result<Value, FuncError> {
    let fallback = arg("default", args, 0)?;
    match args.get(1) {
        Some(v) if !is_empty(v) => Ok(v.clone()),
        _ => Ok(fallback.clone()),
    }
}

fn empty(args: &[Value]) -> Result<Value, FuncError> {
    Ok(Value::Bool(args.first().is_none_or(is_empty)))
}

fn dict(args: &[Value]) -> Result<Value, FuncError> {
    let mut map = HashMap::new();
    for pair in args.chunks(2) {
        let value = pair.get(1).cloned().unwrap_or(Value::Nil);
        map.insert(text(&pair[0]), value);
    }
    Ok(Value::Map(map))
}

fn list(args: &[Value]) -> Result<Value, FuncError> {
    Ok(Value::Array(args.to_vec()))
}

fn has(args: &[Value]) -> Result<Value, FuncError> {
    let needle = arg("has", args, 0)?;
    match arg("has", args, 1)? {
        Value::Array(items) => Ok(Value::Bool(items.contains(needle))),
        _ => Ok(Value::Bool(false)),
    }
}

fn has_key(args: &[Value]) -> Result<Value, FuncError> {
    let key = text(arg("hasKey", args, 1)?);
    match arg("hasKey", args, 0)? {
        Value::Map(m) | Value::Object(m) => Ok(Value::Bool(m.contains_key(&key))),
        _ => Ok(Value::Bool(false)),
    }
}

fn fail(args: &[Value]) -> Result<Value, FuncError> {
    Err(generic(text(arg("fail", args, 0)?)))
}

fn required(args: &[Value]) -> Result<Value, FuncError> {
    let message = text(arg("required", args, 0)?);
    match args.get(1) {
        Some(v) if !matches!(v, Value::Nil | Value::NoValue) && v != &Value::from("") => {
            Ok(v.clone())
        }
        _ => Err(generic(message)),
    }
}

fn deep_copy(args: &[Value]) -> Result<Value, FuncError> {
    Ok(arg("deepCopy", args, 0)?.clone())
}

fn omit(args: &[Value]) -> Result<Value, FuncError> {
    match arg("omit", args, 0)? {
        Value::Map(m) | Value::Object(m) => {
            let drop: Vec<String> = args[1..].iter().map(text).collect();
            Ok(Value::Map(
                m.iter()
                    .filter(|(k, _)| !drop.contains(k))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ))
        }
        other => Err(generic(format!("omit: {other} is not a map"))),
    }
}

/// Sprig's `mergeOverwrite`: later arguments win key by key.
fn merge_overwrite(args: &[Value]) -> Result<Value, FuncError> {
    let mut merged = to_json_value(arg("mergeOverwrite", args, 0)?);
    for overlay in &args[1..] {
        crate::values::merge(
            &mut merged,
            &to_json_value(overlay),
            crate::values::Nulls::Keep,
        );
    }
    Ok(from_json_value(&merged))
}

fn trim_suffix(args: &[Value]) -> Result<Value, FuncError> {
    let suffix = text(arg("trimSuffix", args, 0)?);
    let s = text(arg("trimSuffix", args, 1)?);
    Ok(Value::String(
        s.strip_suffix(suffix.as_str()).unwrap_or(&s).to_string(),
    ))
}

/// Sprig's `int`: numbers truncate, strings parse, anything else is 0.
fn int(args: &[Value]) -> Result<Value, FuncError> {
    Ok(Value::from(match arg("int", args, 0)? {
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_f64().map(|f| f as i64))
            .unwrap_or(0),
        Value::String(s) => s.trim().parse().unwrap_or(0),
        Value::Bool(b) => i64::from(*b),
        _ => 0,
    }))
}

/// Sprig's `ternary`: the first value when the condition (last) is true, else the second.
fn ternary(args: &[Value]) -> Result<Value, FuncError> {
    let condition = arg("ternary", args, 2)?;
    let chosen = if matches!(condition, Value::Bool(true)) {
        0
    } else {
        1
    };
    Ok(arg("ternary", args, chosen)?.clone())
}

fn contains(args: &[Value]) -> Result<Value, FuncError> {
    let needle = text(arg("contains", args, 0)?);
    Ok(Value::Bool(
        text(arg("contains", args, 1)?).contains(&needle),
    ))
}

fn to_string(args: &[Value]) -> Result<Value, FuncError> {
    Ok(Value::String(text(arg("toString", args, 0)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(template: &str, values: serde_json::Value) -> Result<String, String> {
        let mut t = super::template("t");
        t.parse(template).map_err(|e| e.to_string())?;
        with_helpers(r#"{{- define "h" -}}name: {{ .n }}{{- end }}"#, || {
            t.render(&Context::from(from_json_value(&values)))
                .map_err(|e| e.to_string())
        })
    }

    #[test]
    fn functions_act_as_helms() {
        let v = serde_json::json!({"n": "weftd", "m": {"b": 1, "a": [1, 2]}, "empty": ""});
        for (template, expected) in [
            (r#"{{ include "h" . | nindent 2 }}"#, "\n  name: weftd"),
            (r#"{{ .m | toYaml }}"#, "a:\n- 1\n- 2\nb: 1"),
            (r#"{{ .empty | default "x" }}"#, "x"),
            (r#"{{ .n | default "x" | quote }}"#, "\"weftd\""),
            (r#"{{ (fromYaml "a: {b: 2}").a.b }}"#, "2"),
            (
                r#"{{ (mergeOverwrite (dict "a" (dict "x" 1 "y" 2)) (dict "a" (dict "y" 3))) | toJson }}"#,
                r#"{"a":{"x":1,"y":3}}"#,
            ),
            (r#"{{ has "demo" (list "default" "demo") }}"#, "true"),
            (r#"{{ "29+" | trimSuffix "+" | int }}"#, "29"),
            (r#"{{ omit .m "a" | toJson }}"#, r#"{"b":1}"#),
            (r#"{{ hasKey .m "b" }}"#, "true"),
        ] {
            assert_eq!(
                render(template, v.clone()).as_deref(),
                Ok(expected),
                "{template}"
            );
        }
    }

    #[test]
    fn fail_and_required_stop_the_render_with_their_message() {
        let err =
            render(r#"{{ fail "no such profile" }}"#, serde_json::json!({})).expect_err("fails");
        assert!(err.contains("no such profile"), "{err}");
        let err = render(
            r#"{{ required "hub is required" .hub }}"#,
            serde_json::json!({}),
        )
        .expect_err("fails");
        assert!(err.contains("hub is required"), "{err}");
    }
}
