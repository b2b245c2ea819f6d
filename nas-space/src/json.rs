//! The versioned JSON form of a [`CellSpec`] (feature `serde`).
//!
//! ```json
//! {
//!   "format": "nas-space/cellspec",
//!   "version": 1,
//!   "normal": {
//!     "blocks": [
//!       { "inputs": [0, 1], "ops": ["sep_conv_5x5", "sep_conv_3x3"], "combine": "add" }
//!     ],
//!     "output": { "concat": [1, 2] }
//!   },
//!   "reduction": {
//!     "blocks": [
//!       { "inputs": [0, 0], "ops": ["max_pool_3x3", "identity"], "combine": "concat" }
//!     ],
//!     "output": "unused"
//!   }
//! }
//! ```
//!
//! Ops and combines are their stable names ([`Op::name`], [`Combine::name`]); reading
//! goes through `FromStr`, so TF-Slim and DARTS aliases work. State numbering is
//! TF-Slim's, as in the text form. On read, `format` and `version` are optional,
//! unknown fields are rejected so that typos surface, and the spec must pass
//! [`CellSpec::validate`].

use std::path::Path;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{Block, Cell, CellOutput, CellSpec, Combine, Op, SpecError};

/// The `format` tag of a cell spec file.
pub const FORMAT: &str = "nas-space/cellspec";

/// The format version this build writes and reads.
pub const FORMAT_VERSION: u64 = 1;

impl CellSpec {
    /// The JSON form, pretty-printed (arrays of numbers or names on one line), with a
    /// trailing newline.
    pub fn to_json(&self) -> String {
        let pretty = serde_json::to_string_pretty(self).expect("a cell spec always serializes");
        let mut json = inline_flat_arrays(&pretty);
        json.push('\n');
        json
    }

    /// Reads the JSON form. Malformed JSON, a wrong shape, an unknown field and a spec
    /// that fails [`CellSpec::validate`] are [`SpecError::Json`] with the position
    /// serde_json reports; a `version` other than [`FORMAT_VERSION`] is
    /// [`SpecError::FormatVersion`], whatever else the file holds.
    pub fn from_json(json: &str) -> Result<CellSpec, SpecError> {
        // Peek at the version first: a newer file may have fields this build rejects.
        #[derive(Deserialize)]
        struct VersionOnly {
            version: Option<serde_json::Value>,
        }
        if let Ok(VersionOnly { version: Some(version) }) = serde_json::from_str(json) {
            if let Some(found) = version.as_u64().filter(|&v| v != FORMAT_VERSION) {
                return Err(SpecError::FormatVersion { found, supported: FORMAT_VERSION });
            }
        }
        serde_json::from_str(json).map_err(json_error)
    }

    /// Reads either form: JSON when the text starts with `{` (after white space), the text
    /// form otherwise.
    pub fn from_text_or_json(text: &str) -> Result<CellSpec, SpecError> {
        if looks_like_json(text) {
            CellSpec::from_json(text)
        } else {
            CellSpec::from_text(text)
        }
    }

    /// Reads a spec file: JSON when its name ends in `.json` (any case) or its text starts
    /// with `{`, the text form otherwise. Errors name the file ([`SpecError::Io`],
    /// [`SpecError::InFile`]).
    pub fn read_file(path: &Path) -> Result<CellSpec, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|error| SpecError::Io { path: path.to_path_buf(), error })?;
        let json_name = path.extension().is_some_and(|ext| ext.eq_ignore_ascii_case("json"));
        let spec =
            if json_name || looks_like_json(&text) { CellSpec::from_json(&text) } else { CellSpec::from_text(&text) };
        spec.map_err(|error| SpecError::InFile { path: path.to_path_buf(), error: Box::new(error) })
    }
}

fn looks_like_json(text: &str) -> bool {
    text.trim_start().starts_with('{')
}

fn json_error(err: serde_json::Error) -> SpecError {
    let (line, column) = (err.line(), err.column());
    let full = err.to_string();
    let message = match full.strip_suffix(&format!(" at line {line} column {column}")) {
        Some(message) => message.to_string(),
        None => full,
    };
    SpecError::Json { line, column, message }
}

/// Puts every array that holds no array or object on one line: `[0, 1]` instead of
/// serde_json's one element per line. Sound here because no string of a cell spec
/// (op and combine names, the format tag) contains a bracket, brace or comma.
fn inline_flat_arrays(pretty: &str) -> String {
    let mut out = String::with_capacity(pretty.len());
    let mut rest = pretty;
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..=open]);
        rest = &rest[open + 1..];
        let close = rest.find(']').expect("serde_json closes every array");
        let inner = &rest[..close];
        if !inner.contains(['[', '{']) {
            let items: Vec<&str> = inner.split(',').map(str::trim).collect();
            out.push_str(&items.join(", "));
            rest = &rest[close..];
        }
    }
    out.push_str(rest);
    out
}

impl Serialize for Op {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Op {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(D::Error::custom)
    }
}

impl Serialize for Combine {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Combine {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(D::Error::custom)
    }
}

/// The JSON shape of a [`Block`] (serde's remote derive: same fields as the real type).
#[derive(Serialize, Deserialize)]
#[serde(remote = "Block", deny_unknown_fields)]
struct BlockDef {
    inputs: [usize; 2],
    ops: [Op; 2],
    combine: Combine,
}

impl Serialize for Block {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        BlockDef::serialize(self, serializer)
    }
}

impl<'de> Deserialize<'de> for Block {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        BlockDef::deserialize(deserializer)
    }
}

/// The JSON shape of a [`CellOutput`]: `{"concat": [..]}` or `"unused"`.
#[derive(Serialize, Deserialize)]
#[serde(remote = "CellOutput")]
enum CellOutputDef {
    #[serde(rename = "concat")]
    Concat(Vec<usize>),
    #[serde(rename = "unused")]
    UnusedBlocks,
}

impl Serialize for CellOutput {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        CellOutputDef::serialize(self, serializer)
    }
}

impl<'de> Deserialize<'de> for CellOutput {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        CellOutputDef::deserialize(deserializer)
    }
}

/// The JSON shape of a [`Cell`]. A lone cell is not validated: that needs its kind.
#[derive(Serialize, Deserialize)]
#[serde(remote = "Cell", deny_unknown_fields)]
struct CellDef {
    blocks: Vec<Block>,
    output: CellOutput,
}

impl Serialize for Cell {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        CellDef::serialize(self, serializer)
    }
}

impl<'de> Deserialize<'de> for Cell {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        CellDef::deserialize(deserializer)
    }
}

/// What a [`CellSpec`] writes: the format tag and version first.
#[derive(Serialize)]
struct SpecOut<'a> {
    format: &'static str,
    version: u64,
    normal: &'a Cell,
    reduction: &'a Cell,
}

/// What a [`CellSpec`] reads.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecIn {
    format: Option<String>,
    version: Option<u64>,
    normal: Cell,
    reduction: Cell,
}

impl Serialize for CellSpec {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        SpecOut { format: FORMAT, version: FORMAT_VERSION, normal: &self.normal, reduction: &self.reduction }
            .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for CellSpec {
    /// Checks the format tag and version, then [`CellSpec::validate`]s the result.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = SpecIn::deserialize(deserializer)?;
        if let Some(format) = raw.format.filter(|format| format != FORMAT) {
            return Err(D::Error::custom(format_args!("unknown format `{format}`, expected `{FORMAT}`")));
        }
        let found = raw.version.unwrap_or(FORMAT_VERSION);
        if found != FORMAT_VERSION {
            let err = SpecError::FormatVersion { found, supported: FORMAT_VERSION };
            return Err(D::Error::custom(err));
        }
        let spec = CellSpec { normal: raw.normal, reduction: raw.reduction };
        spec.validate().map_err(D::Error::custom)?;
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use expect_test::{expect, Expect};

    use super::*;

    fn hand_built() -> CellSpec {
        use Op::*;
        CellSpec {
            normal: Cell {
                blocks: vec![
                    Block { inputs: [1, 0], ops: [Conv1x7Then7x1, DilConv3x3], combine: Combine::Concat },
                    Block::add((2, MaxPool7x7), (0, Conv1x3Then3x1)),
                ],
                output: CellOutput::UnusedBlocks,
            },
            reduction: Cell {
                blocks: vec![
                    Block::add((0, Conv3x3), (1, MaxPool5x5)),
                    Block { inputs: [2, 2], ops: [Conv1x1, SepConv7x7], combine: Combine::Concat },
                ],
                output: CellOutput::Concat(vec![3, 0]),
            },
        }
    }

    #[test]
    fn nasnet_a_json_golden() {
        expect![[r#"
            {
              "format": "nas-space/cellspec",
              "version": 1,
              "normal": {
                "blocks": [
                  {
                    "inputs": [0, 1],
                    "ops": ["sep_conv_5x5", "sep_conv_3x3"],
                    "combine": "add"
                  },
                  {
                    "inputs": [1, 1],
                    "ops": ["sep_conv_5x5", "sep_conv_3x3"],
                    "combine": "add"
                  },
                  {
                    "inputs": [0, 1],
                    "ops": ["avg_pool_3x3", "identity"],
                    "combine": "add"
                  },
                  {
                    "inputs": [1, 1],
                    "ops": ["avg_pool_3x3", "avg_pool_3x3"],
                    "combine": "add"
                  },
                  {
                    "inputs": [0, 0],
                    "ops": ["sep_conv_3x3", "identity"],
                    "combine": "add"
                  }
                ],
                "output": {
                  "concat": [1, 2, 3, 4, 5, 6]
                }
              },
              "reduction": {
                "blocks": [
                  {
                    "inputs": [0, 1],
                    "ops": ["sep_conv_5x5", "sep_conv_7x7"],
                    "combine": "add"
                  },
                  {
                    "inputs": [0, 1],
                    "ops": ["max_pool_3x3", "sep_conv_7x7"],
                    "combine": "add"
                  },
                  {
                    "inputs": [0, 1],
                    "ops": ["avg_pool_3x3", "sep_conv_5x5"],
                    "combine": "add"
                  },
                  {
                    "inputs": [3, 2],
                    "ops": ["identity", "avg_pool_3x3"],
                    "combine": "add"
                  },
                  {
                    "inputs": [2, 0],
                    "ops": ["sep_conv_3x3", "max_pool_3x3"],
                    "combine": "add"
                  }
                ],
                "output": {
                  "concat": [3, 4, 5, 6]
                }
              }
            }
        "#]]
        .assert_eq(&CellSpec::nasnet_a().to_json());
    }

    #[test]
    fn specs_round_trip() {
        for spec in [CellSpec::nasnet_a(), hand_built()] {
            let json = spec.to_json();
            assert!(json.ends_with("}\n"));
            assert_eq!(CellSpec::from_json(&json).unwrap(), spec, "json:\n{json}");
            // The plain serde path agrees with `from_json`.
            let compact = serde_json::to_string(&spec).unwrap();
            assert_eq!(serde_json::from_str::<CellSpec>(&compact).unwrap(), spec);
        }
    }

    #[test]
    fn parts_serialize_as_documented() {
        assert_eq!(serde_json::to_string(&Op::Conv1x7Then7x1).unwrap(), r#""conv_1x7_7x1""#);
        assert_eq!(serde_json::to_string(&Combine::Concat).unwrap(), r#""concat""#);
        assert_eq!(serde_json::to_string(&CellOutput::UnusedBlocks).unwrap(), r#""unused""#);
        assert_eq!(serde_json::to_string(&CellOutput::Concat(vec![2, 0])).unwrap(), r#"{"concat":[2,0]}"#);
        let block = Block { inputs: [1, 0], ops: [Op::Identity, Op::Conv3x3], combine: Combine::Concat };
        let json = serde_json::to_string(&block).unwrap();
        assert_eq!(json, r#"{"inputs":[1,0],"ops":["identity","conv_3x3"],"combine":"concat"}"#);
        assert_eq!(serde_json::from_str::<Block>(&json).unwrap(), block);
        let cell = &hand_built().normal;
        assert_eq!(serde_json::from_str::<Cell>(&serde_json::to_string(cell).unwrap()).unwrap(), *cell);
    }

    #[test]
    fn aliases_and_optional_header_fields_are_read() {
        let json = r#"{
            "normal": {
                "blocks": [{"inputs": [0, 1], "ops": ["separable_5x5_2", "none"], "combine": "sum"}],
                "output": "unused"
            },
            "reduction": {
                "blocks": [{"inputs": [1, 0], "ops": ["MAX_POOL_3X3", "skip_connect"], "combine": "cat"}],
                "output": {"concat": [2, 1]}
            }
        }"#;
        let spec = CellSpec::from_json(json).unwrap();
        assert_eq!(spec.normal.blocks, [Block::add((0, Op::SepConv5x5), (1, Op::Identity))]);
        assert_eq!(spec.normal.output, CellOutput::UnusedBlocks);
        assert_eq!(
            spec.reduction.blocks,
            [Block { inputs: [1, 0], ops: [Op::MaxPool3x3, Op::Identity], combine: Combine::Concat }]
        );
        assert_eq!(spec.reduction.output, CellOutput::Concat(vec![2, 1]));
    }

    /// Each malformed file and what reading it says: the kind of mistake, then the message
    /// with serde_json's line and column.
    #[test]
    fn read_errors_name_the_mistake_and_point_at_it() {
        let json = CellSpec::nasnet_a().to_json();
        let mut bad_input = CellSpec::nasnet_a();
        bad_input.reduction.blocks[3].inputs[1] = 5;
        let mut empty_concat = CellSpec::nasnet_a();
        empty_concat.normal.output = CellOutput::Concat(vec![]);
        let cases: Vec<(String, Expect)> = vec![
            (json.replace(r#""version": 1"#, r#""version": 2"#), expect!["FormatVersion: cell spec format version 2 is not supported (this build reads version 1)"]),
            // The version is checked before the shape: a newer file may carry fields this build rejects.
            (r#"{"version": 7, "normal": {}, "cells": []}"#.to_string(), expect!["FormatVersion: cell spec format version 7 is not supported (this build reads version 1)"]),
            (json.replace("nas-space/cellspec", "nas-space/network"), expect!["Json: invalid cell spec JSON at line 0, column 0: unknown format `nas-space/network`, expected `nas-space/cellspec`"]),
            (json.replacen(r#""combine""#, r#""combin""#, 1), expect!["Json: invalid cell spec JSON at line 9, column 16: unknown field `combin`, expected one of `inputs`, `ops`, `combine`"]),
            (json.replace(r#""output""#, r#""outputs""#), expect!["Json: invalid cell spec JSON at line 32, column 13: unknown field `outputs`, expected `blocks` or `output`"]),
            (json.replace(r#""format""#, r#""formt""#), expect!["Json: invalid cell spec JSON at line 2, column 9: unknown field `formt`, expected one of `format`, `version`, `normal`, `reduction`"]),
            // A spec that fails validation names the cell and the block.
            (bad_input.to_json(), expect!["Json: invalid cell spec JSON at line 0, column 0: reduction cell, block 3: right input 5 is out of range (block 3 may read states 0..=4)"]),
            (empty_concat.to_json(), expect!["Json: invalid cell spec JSON at line 0, column 0: normal cell: the output concat list is empty"]),
            (json.replacen("sep_conv_5x5", "sep_conv_9x9", 1), expect!["Json: invalid cell spec JSON at line 8, column 32: unknown op `sep_conv_9x9`; known ops: identity, conv_1x3_3x1, conv_1x7_7x1, dil_conv_3x3, avg_pool_3x3, max_pool_3x3, max_pool_5x5, max_pool_7x7, conv_1x1, conv_3x3, sep_conv_3x3, sep_conv_5x5, sep_conv_7x7"]),
            (json.replacen(r#""add""#, r#""mul""#, 1), expect!["Json: invalid cell spec JSON at line 10, column 7: unknown combine `mul`; known: add, concat"]),
            (json.replacen(r#""concat": [1"#, r#""concat": [1,,"#, 1), expect!["Json: invalid cell spec JSON at line 33, column 20: expected value"]),
            (r#"{"normal": {"blocks": [], "output": "all"}}"#.to_string(), expect!["Json: invalid cell spec JSON at line 1, column 41: unknown variant `all`, expected `concat` or `unused`"]),
            ("{".to_string(), expect!["Json: invalid cell spec JSON at line 1, column 1: EOF while parsing an object"]),
        ];
        for (text, expected) in cases {
            let err = CellSpec::from_json(&text).expect_err("a malformed spec");
            let kind = format!("{err:?}");
            let kind = kind.split([' ', '{', '(']).next().unwrap_or_default();
            expected.assert_eq(&format!("{kind}: {err}"));
        }
    }

    #[test]
    fn plain_serde_reports_other_versions_as_a_message() {
        let json = CellSpec::nasnet_a().to_json().replace(r#""version": 1"#, r#""version": 2"#);
        let err = serde_json::from_str::<CellSpec>(&json).unwrap_err();
        assert!(err.to_string().contains("format version 2 is not supported"), "{err}");
    }

    #[test]
    fn either_form_is_read_by_its_first_character() {
        let spec = hand_built();
        assert_eq!(CellSpec::from_text_or_json(&spec.to_json()).unwrap(), spec);
        assert_eq!(CellSpec::from_text_or_json(&format!("\n  {}", spec.to_json())).unwrap(), spec);
        assert_eq!(CellSpec::from_text_or_json(&spec.to_text()).unwrap(), spec);
        assert!(matches!(CellSpec::from_text_or_json("{ normal:"), Err(SpecError::Json { .. })));
        assert!(matches!(CellSpec::from_text_or_json("normal: {"), Err(SpecError::Syntax { .. })));
    }

    /// A spec file is JSON by its name or by its first character; every error names the file.
    #[test]
    fn read_file_picks_the_form_and_names_the_file() {
        let dir = std::env::temp_dir().join(format!("nas-space-read-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let spec = hand_built();
        for (name, text) in [("a.JSON", spec.to_json()), ("b.cell", spec.to_json()), ("c.cell", spec.to_text())] {
            std::fs::write(dir.join(name), text).unwrap();
            assert_eq!(CellSpec::read_file(&dir.join(name)).unwrap(), spec, "{name}");
        }
        std::fs::write(dir.join("d.json"), spec.to_text()).unwrap();
        std::fs::write(dir.join("e.cell"), "normal:\n  h2 = add(identity(h0), identity(h9))\n").unwrap();
        let err = CellSpec::read_file(&dir.join("d.json")).unwrap_err();
        assert!(matches!(err.kind(), SpecError::Json { line: 1, column: 1, .. }), "{err:?}");
        let err = CellSpec::read_file(&dir.join("e.cell")).unwrap_err();
        assert!(matches!(err.kind(), SpecError::InputOutOfRange { index: 9, .. }), "{err:?}");
        let message = err.to_string().replace(dir.to_str().unwrap(), "DIR");
        expect!["in cell spec DIR/e.cell: line 2, column 35: normal cell, block 0: right input 9 is out of range (block 0 may read states 0..=1)"]
            .assert_eq(&message);
        let err = CellSpec::read_file(&dir.join("missing.cell")).unwrap_err();
        assert!(matches!(&err, SpecError::Io { path, .. } if path.ends_with("missing.cell")), "{err:?}");
        assert!(
            err.to_string().starts_with(&format!("cannot read cell spec {}", dir.join("missing.cell").display())),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn network_config_round_trips() {
        for config in [crate::NetworkConfig::cifar(), crate::NetworkConfig::mobile(), crate::NetworkConfig::large()] {
            let json = serde_json::to_string(&config).unwrap();
            assert_eq!(serde_json::from_str::<crate::NetworkConfig>(&json).unwrap(), config);
        }
        let json = serde_json::to_string(&crate::NetworkConfig::mobile()).unwrap();
        assert!(json.contains(r#""stem":"imagenet""#), "{json}");
        let typo = json.replace("num_classes", "num_class");
        assert!(serde_json::from_str::<crate::NetworkConfig>(&typo).is_err());
    }
}
