//! Conversions between `google.protobuf.Struct` (node and cluster metadata) and JSON values.

use serde_json::{Map, Number, Value};

use crate::pb::google::protobuf::{self as wkt, value::Kind};

pub fn struct_to_json(s: &wkt::Struct) -> Map<String, Value> {
    s.fields
        .iter()
        .map(|(k, v)| (k.clone(), value_to_json(v)))
        .collect()
}

pub fn value_to_json(v: &wkt::Value) -> Value {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::NumberValue(n)) => Number::from_f64(*n).map_or(Value::Null, Value::Number),
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::StructValue(s)) => Value::Object(struct_to_json(s)),
        Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(value_to_json).collect()),
    }
}

pub fn json_to_struct(m: &Map<String, Value>) -> wkt::Struct {
    wkt::Struct {
        fields: m
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect(),
    }
}

pub fn json_to_value(v: &Value) -> wkt::Value {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(wkt::ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        Value::Object(m) => Kind::StructValue(json_to_struct(m)),
    };
    wkt::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_through_struct() {
        let json = serde_json::json!({"NAMESPACE": "demo", "LABELS": {"app": "a"}, "n": 1.5, "l": [true, null]});
        let Value::Object(map) = json.clone() else {
            unreachable!()
        };
        assert_eq!(Value::Object(struct_to_json(&json_to_struct(&map))), json);
    }
}
