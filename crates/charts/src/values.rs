//! Values as Helm combines them: the chart's `values.yaml`, then each `-f` file, then each `--set`,
//! later ones winning key by key, and `null` deleting a key.

use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ValuesError {
    #[error("--set {0:?}: expected key=value")]
    NoValue(String),
    #[error("--set {0:?}: {1}")]
    BadKey(String, String),
    #[error("{0}: not a YAML mapping of values: {1}")]
    File(String, String),
}

/// What a `null` in the overlay does when merging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nulls {
    /// Helm's coalescing of values: `null` removes the key.
    Delete,
    /// Sprig's `mergeOverwrite`: `null` is a value like any other.
    Keep,
}

/// `overlay` over `base`: maps merge key by key, anything else is replaced.
pub fn merge(base: &mut Value, overlay: &Value, nulls: Nulls) {
    match (base, overlay) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                if v.is_null() && nulls == Nulls::Delete {
                    b.remove(k);
                    continue;
                }
                match b.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => {
                        merge(existing, v, nulls)
                    }
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (base, overlay) => *base = overlay.clone(),
    }
}

/// Helm's coalescing: `overlay` over `base`, maps merged deeply, `null` removing the key.
pub fn coalesce(base: &mut Value, overlay: &Value) {
    merge(base, overlay, Nulls::Delete);
}

/// A values file's contents (`-f`): a mapping, or nothing.
pub fn parse_file(name: &str, text: &str) -> Result<Value, ValuesError> {
    if text.trim().is_empty() {
        return Ok(Value::Object(Map::new()));
    }
    match serde_saphyr::from_str::<Value>(text) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(Value::Null) => Ok(Value::Object(Map::new())),
        Ok(_) => Err(ValuesError::File(
            name.into(),
            "the top level is not a mapping".into(),
        )),
        Err(e) => Err(ValuesError::File(name.into(), e.to_string())),
    }
}

/// Splits on `sep` where it is not escaped with a backslash, dropping the escapes of `sep`.
fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&sep) => {
                current.push(sep);
                chars.next();
            }
            c if c == sep => parts.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    parts.push(current);
    parts
}

/// Helm's typing of a `--set` value: booleans, `null`, integers, and strings for the rest.
fn typed(value: &str) -> Value {
    match value {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        "null" => Value::Null,
        v => v
            .parse::<i64>()
            .ok()
            .filter(|_| !(v.len() > 1 && v.starts_with('0')))
            .map_or_else(|| Value::String(v.to_string()), Value::from),
    }
}

/// One `--set a.b[0].c=v,x=y` argument, applied onto `values`.
pub fn apply_set(values: &mut Value, arg: &str) -> Result<(), ValuesError> {
    for pair in split_unescaped(arg, ',') {
        if pair.is_empty() {
            continue;
        }
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| ValuesError::NoValue(pair.clone()))?;
        let mut path = Vec::new();
        for segment in split_unescaped(key, '.') {
            let (name, index) = match segment.split_once('[') {
                None => (segment.clone(), None),
                Some((name, rest)) => {
                    let index = rest
                        .strip_suffix(']')
                        .and_then(|i| i.parse::<usize>().ok())
                        .ok_or_else(|| {
                            ValuesError::BadKey(
                                pair.clone(),
                                format!("{segment:?} has a bad list index"),
                            )
                        })?;
                    (name.to_string(), Some(index))
                }
            };
            if name.is_empty() {
                return Err(ValuesError::BadKey(pair.clone(), "an empty key".into()));
            }
            path.push((name, index));
        }
        set_path(values, &path, typed(value));
    }
    Ok(())
}

fn set_path(values: &mut Value, path: &[(String, Option<usize>)], value: Value) {
    let Some(((name, index), rest)) = path.split_first() else {
        *values = value;
        return;
    };
    if !values.is_object() {
        *values = Value::Object(Map::new());
    }
    let Value::Object(map) = values else { return };
    let slot = map.entry(name.clone()).or_insert(Value::Null);
    let slot = match index {
        None => slot,
        Some(i) => {
            if !slot.is_array() {
                *slot = Value::Array(Vec::new());
            }
            let Value::Array(items) = slot else { return };
            while items.len() <= *i {
                items.push(Value::Null);
            }
            &mut items[*i]
        }
    };
    if rest.is_empty() {
        *slot = value;
    } else {
        set_path(slot, rest, value);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn set_arguments_type_and_nest_as_helms() {
        let mut v = json!({"global": {"hub": "a", "tag": "1"}});
        apply_set(
            &mut v,
            "global.hub=b,pilot.replicaCount=2,pilot.autoscaleEnabled=false",
        )
        .expect("set");
        apply_set(&mut v, r"pilot.env.A\,B=x\,y,list[1]=z,tag=007,gone=null").expect("set");
        assert_eq!(
            v,
            json!({
                "global": {"hub": "b", "tag": "1"},
                "pilot": {"replicaCount": 2, "autoscaleEnabled": false, "env": {"A,B": "x,y"}},
                "list": [null, "z"],
                "tag": "007",
                "gone": null,
            })
        );
        assert!(matches!(
            apply_set(&mut v, "novalue"),
            Err(ValuesError::NoValue(_))
        ));
        assert!(matches!(
            apply_set(&mut v, "a[x]=1"),
            Err(ValuesError::BadKey(..))
        ));
    }

    #[test]
    fn later_values_win_and_null_deletes() {
        let mut base = json!({"a": {"b": 1, "c": 2}, "d": [1]});
        coalesce(&mut base, &json!({"a": {"c": null, "e": 3}, "d": [2, 3]}));
        assert_eq!(base, json!({"a": {"b": 1, "e": 3}, "d": [2, 3]}));
    }
}
