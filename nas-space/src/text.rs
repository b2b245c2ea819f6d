//! The human-readable text form of a [`CellSpec`].
//!
//! One line per block, `hK = combine(op(hI), op(hJ))`, with TF-Slim's state numbering
//! (`nasnet_utils.py`, `_cell_base`): h0 is h_i, h1 is h_{i-1}, h2.. are block outputs.
//! A cell ends with `out = concat(hA, hB, ...)` or `out = unused`:
//!
//! ```text
//! version 1
//! normal:
//!   h2 = add(sep_conv_5x5(h0), sep_conv_3x3(h1))
//!   out = concat(h1, h2)
//! reduction:
//!   h2 = add(max_pool_3x3(h0), identity(h1))
//!   out = unused
//! ```
//!
//! The parser is a small hand-written line lexer plus a recursive-descent reader.
//! Every error carries the 1-based line and column of the offending token: syntax
//! problems are [`SpecError::Syntax`], and semantic ones (an unknown op, a state
//! out of range, ...) are the typed error wrapped in [`SpecError::At`].

use std::fmt;
use std::str::FromStr;

use crate::{Block, Cell, CellKind, CellOutput, CellSpec, Combine, Op, Side, SpecError};

/// The version of the text form this build writes and reads.
const TEXT_VERSION: u64 = 1;

/// The comment lines that open every printed spec.
const HEADER: &str = "\
# NASNet cell spec (nas-space text form)
# h0 = h_i (previous cell after the preamble), h1 = h_{i-1} (cell before that, adjusted),
# h2.. = block outputs; a block is `hK = combine(op(hI), op(hJ))`
";

impl CellSpec {
    /// The text form, the same as `to_string()`: a comment header, `version 1`, then a
    /// `normal:` and a `reduction:` section, each with one `hK = combine(op(hI), op(hJ))`
    /// line per block and a last `out = concat(hA, ...)` or `out = unused` line.
    /// Every line, the last one included, ends with a newline.
    pub fn to_text(&self) -> String {
        self.to_string()
    }

    /// Parses the text form. Accepts what [`CellSpec::to_text`] writes, plus comments,
    /// any indentation, bare state numbers (`1` for `h1`), sections in either order
    /// and the op aliases [`Op::from_str`] knows. The result passes [`CellSpec::validate`].
    pub fn from_text(text: &str) -> Result<CellSpec, SpecError> {
        Parser::default().parse(text)
    }
}

impl fmt::Display for CellSpec {
    /// Writes the text form, one line per block, each line ending with a newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(HEADER)?;
        writeln!(f, "version {TEXT_VERSION}")?;
        for kind in CellKind::ALL {
            writeln!(f, "{kind}:")?;
            write_cell(f, self.cell(kind))?;
        }
        Ok(())
    }
}

impl FromStr for CellSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CellSpec::from_text(s)
    }
}

fn write_cell(f: &mut fmt::Formatter<'_>, cell: &Cell) -> fmt::Result {
    for (b, block) in cell.blocks.iter().enumerate() {
        let [left, right] = block.inputs;
        let [left_op, right_op] = block.ops;
        writeln!(f, "  h{} = {}({left_op}(h{left}), {right_op}(h{right}))", 2 + b, block.combine)?;
    }
    match &cell.output {
        CellOutput::Concat(states) => {
            let states: Vec<String> = states.iter().map(|s| format!("h{s}")).collect();
            writeln!(f, "  out = concat({})", states.join(", "))
        }
        CellOutput::UnusedBlocks => writeln!(f, "  out = unused"),
    }
}

/// A 1-based line and column (counted in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pos {
    line: usize,
    column: usize,
}

impl Pos {
    fn syntax(self, message: impl Into<String>) -> SpecError {
        SpecError::Syntax { line: self.line, column: self.column, message: message.into() }
    }

    fn at(self, source: SpecError) -> SpecError {
        SpecError::At { line: self.line, column: self.column, error: Box::new(source) }
    }
}

/// What the lexer sees on a line: words (`h2`, `sep_conv_3x3`, `1`), single-character
/// symbols (`=`, `(`, `)`, `,`, `:` and anything unexpected), and the end of the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok<'a> {
    Word(&'a str),
    Sym(char),
    End,
}

#[derive(Debug, Clone, Copy)]
struct Token<'a> {
    tok: Tok<'a>,
    pos: Pos,
}

impl Token<'_> {
    /// The token as error messages quote it.
    fn describe(&self) -> String {
        match self.tok {
            Tok::Word(word) => format!("`{word}`"),
            Tok::Sym(c) => format!("`{c}`"),
            Tok::End => "end of line".to_string(),
        }
    }

    /// A syntax error at this token: `expected {what}, found {this token}`.
    fn expected(&self, what: &str) -> SpecError {
        self.pos.syntax(format!("expected {what}, found {}", self.describe()))
    }
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The tokens of one line of input, comments dropped, always ending with `Tok::End`.
#[derive(Debug)]
struct Cursor<'a> {
    tokens: Vec<Token<'a>>,
    next: usize,
}

impl<'a> Cursor<'a> {
    fn new(line: usize, text: &'a str) -> Cursor<'a> {
        let mut tokens = Vec::new();
        let mut column = 0;
        let mut end_column = 1;
        let mut chars = text.char_indices().peekable();
        while let Some((start, c)) = chars.next() {
            column += 1;
            if c == '#' {
                break;
            }
            if c.is_whitespace() {
                continue;
            }
            let pos = Pos { line, column };
            if is_word_char(c) {
                let mut end = start + c.len_utf8();
                while let Some(&(i, c)) = chars.peek().filter(|&&(_, c)| is_word_char(c)) {
                    end = i + c.len_utf8();
                    column += 1;
                    chars.next();
                }
                tokens.push(Token { tok: Tok::Word(&text[start..end]), pos });
            } else {
                tokens.push(Token { tok: Tok::Sym(c), pos });
            }
            end_column = column + 1;
        }
        tokens.push(Token { tok: Tok::End, pos: Pos { line, column: end_column } });
        Cursor { tokens, next: 0 }
    }

    fn is_blank(&self) -> bool {
        self.tokens.len() == 1
    }

    fn peek(&self) -> Token<'a> {
        self.tokens[self.next]
    }

    /// The next token; stays on `Tok::End` once there.
    fn bump(&mut self) -> Token<'a> {
        let token = self.peek();
        if token.tok != Tok::End {
            self.next += 1;
        }
        token
    }

    fn expect_sym(&mut self, c: char, what: &str) -> Result<Token<'a>, SpecError> {
        let token = self.bump();
        if token.tok == Tok::Sym(c) {
            Ok(token)
        } else {
            Err(token.expected(what))
        }
    }

    fn expect_end(&mut self) -> Result<(), SpecError> {
        let token = self.bump();
        match token.tok {
            Tok::End => Ok(()),
            _ => Err(token.expected("end of line")),
        }
    }

    /// A state reference, `hI` or `I`, with the token it came from.
    fn state(&mut self) -> Result<(usize, Token<'a>), SpecError> {
        let token = self.bump();
        match token.tok {
            Tok::Word(word) if state_digits(word).is_some() => Ok((parse_index(&token)?, token)),
            _ => Err(token.expected("a state (`hI` or a number)")),
        }
    }
}

/// The digits of `hI` or `I`, if `word` is a state reference.
fn state_digits(word: &str) -> Option<&str> {
    let digits = word.strip_prefix('h').unwrap_or(word);
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then_some(digits)
}

/// The index of a state-reference token.
fn parse_index(token: &Token<'_>) -> Result<usize, SpecError> {
    let Tok::Word(word) = token.tok else { unreachable!("state tokens are words") };
    let digits = state_digits(word).expect("checked state token");
    digits.parse().map_err(|_| token.pos.syntax(format!("state index `{word}` is too large")))
}

/// A cell section being read.
#[derive(Debug)]
struct Section {
    kind: CellKind,
    header: Pos,
    blocks: Vec<Block>,
    output: Option<CellOutput>,
}

#[derive(Debug, Default)]
struct Parser {
    version_seen: bool,
    current: Option<Section>,
    normal: Option<Cell>,
    reduction: Option<Cell>,
}

impl Parser {
    fn parse(mut self, text: &str) -> Result<CellSpec, SpecError> {
        for (idx, line) in text.lines().enumerate() {
            let mut cursor = Cursor::new(idx + 1, line);
            if !cursor.is_blank() {
                self.line(&mut cursor)?;
            }
        }
        let end = end_of_input(text);
        self.close_section(end, "end of input")?;
        let missing = |kind: CellKind| end.syntax(format!("expected a `{kind}:` section, found end of input"));
        let normal = self.normal.ok_or_else(|| missing(CellKind::Normal))?;
        let reduction = self.reduction.ok_or_else(|| missing(CellKind::Reduction))?;
        let spec = CellSpec { normal, reduction };
        spec.validate()?;
        Ok(spec)
    }

    fn line(&mut self, cursor: &mut Cursor<'_>) -> Result<(), SpecError> {
        let first = cursor.bump();
        match (first.tok, self.current.is_some()) {
            (Tok::Word("version"), _) => self.version(first, cursor),
            (Tok::Word("normal"), _) => self.header(first, CellKind::Normal, cursor),
            (Tok::Word("reduction"), _) => self.header(first, CellKind::Reduction, cursor),
            (Tok::Word("out"), true) => self.output(first, cursor),
            (Tok::Word(word), true) if word.starts_with('h') && state_digits(word).is_some() => {
                self.block(first, cursor)
            }
            (_, true) => Err(first.expected("a block `hK = ...`, an `out = ...` line or a section header")),
            (_, false) => Err(first.expected("`version`, `normal:` or `reduction:`")),
        }
    }

    fn version(&mut self, keyword: Token<'_>, cursor: &mut Cursor<'_>) -> Result<(), SpecError> {
        if self.version_seen {
            return Err(keyword.pos.syntax("duplicate `version` line"));
        }
        if self.current.is_some() || self.normal.is_some() || self.reduction.is_some() {
            return Err(keyword.pos.syntax("`version` must come before the sections"));
        }
        self.version_seen = true;
        let number = cursor.bump();
        let found = match number.tok {
            Tok::Word(word) if word.bytes().all(|b| b.is_ascii_digit()) => {
                word.parse::<u64>().map_err(|_| number.pos.syntax(format!("version number `{word}` is too large")))?
            }
            _ => return Err(number.expected("a version number after `version`")),
        };
        if found != TEXT_VERSION {
            return Err(number.pos.at(SpecError::FormatVersion { found, supported: TEXT_VERSION }));
        }
        cursor.expect_end()
    }

    fn header(&mut self, keyword: Token<'_>, kind: CellKind, cursor: &mut Cursor<'_>) -> Result<(), SpecError> {
        cursor.expect_sym(':', &format!("`:` after `{kind}`"))?;
        cursor.expect_end()?;
        self.close_section(keyword.pos, &format!("`{kind}:`"))?;
        if self.cell_slot(kind).is_some() {
            return Err(keyword.pos.syntax(format!("duplicate `{kind}:` section")));
        }
        self.current = Some(Section { kind, header: keyword.pos, blocks: Vec::new(), output: None });
        Ok(())
    }

    /// Ends the open section (if any) at `pos`, where `found` was met.
    fn close_section(&mut self, pos: Pos, found: &str) -> Result<(), SpecError> {
        let Some(section) = self.current.take() else {
            return Ok(());
        };
        let kind = section.kind;
        if section.blocks.is_empty() {
            return Err(section.header.at(SpecError::NoBlocks { cell: kind }));
        }
        let Some(output) = section.output else {
            return Err(pos.syntax(format!(
                "expected `out = concat(...)` or `out = unused` to end the {kind} cell, found {found}"
            )));
        };
        *self.cell_slot(kind) = Some(Cell { blocks: section.blocks, output });
        Ok(())
    }

    fn cell_slot(&mut self, kind: CellKind) -> &mut Option<Cell> {
        match kind {
            CellKind::Normal => &mut self.normal,
            CellKind::Reduction => &mut self.reduction,
        }
    }

    /// `hK = combine(op(hI), op(hJ))`, `head` being the `hK` token.
    fn block(&mut self, head: Token<'_>, cursor: &mut Cursor<'_>) -> Result<(), SpecError> {
        let section = self.current.as_mut().expect("blocks are read inside a section");
        let kind = section.kind;
        let b = section.blocks.len();
        let defined = parse_index(&head)?;
        if section.output.is_some() {
            return Err(head
                .pos
                .syntax(format!("{kind} cell: block `h{defined}` comes after the `out` line, which must be last")));
        }
        if defined != 2 + b {
            let Tok::Word(found) = head.tok else { unreachable!("block heads are words") };
            return Err(head.pos.syntax(format!("{kind} cell, block {b} must define h{}, found {found}", 2 + b)));
        }
        cursor.expect_sym('=', &format!("`=` after `h{defined}`"))?;
        let name = cursor.bump();
        let combine = match name.tok {
            Tok::Word(word) if state_digits(word).is_none() => {
                word.parse::<Combine>().map_err(|err| name.pos.at(err))?
            }
            _ => return Err(name.expected("a combine (`add` or `concat`)")),
        };
        cursor.expect_sym('(', &format!("`(` after `{combine}`"))?;
        let (left, left_op) = operand(cursor, kind, b, Side::Left)?;
        cursor.expect_sym(',', "`,` between the two ops")?;
        let (right, right_op) = operand(cursor, kind, b, Side::Right)?;
        cursor.expect_sym(')', "`)` to close the block")?;
        cursor.expect_end()?;
        section.blocks.push(Block { inputs: [left, right], ops: [left_op, right_op], combine });
        Ok(())
    }

    /// `out = concat(hA, hB, ...)` or `out = unused`, `keyword` being the `out` token.
    fn output(&mut self, keyword: Token<'_>, cursor: &mut Cursor<'_>) -> Result<(), SpecError> {
        let section = self.current.as_mut().expect("`out` is read inside a section");
        let kind = section.kind;
        if section.output.is_some() {
            return Err(keyword.pos.syntax(format!("the {kind} cell already has an `out` line")));
        }
        if section.blocks.is_empty() {
            return Err(section.header.at(SpecError::NoBlocks { cell: kind }));
        }
        let num_states = 2 + section.blocks.len();
        cursor.expect_sym('=', "`=` after `out`")?;
        let rule = cursor.bump();
        let output = match rule.tok {
            Tok::Word("unused") => CellOutput::UnusedBlocks,
            Tok::Word("concat") => {
                cursor.expect_sym('(', "`(` after `concat`")?;
                if cursor.peek().tok == Tok::Sym(')') {
                    return Err(rule.pos.at(SpecError::EmptyConcat { cell: kind }));
                }
                let mut states = Vec::new();
                loop {
                    let (index, token) = cursor.state()?;
                    if index >= num_states {
                        let err = SpecError::ConcatOutOfRange { cell: kind, index, num_states };
                        return Err(token.pos.at(err));
                    }
                    if states.contains(&index) {
                        return Err(token.pos.at(SpecError::DuplicateConcat { cell: kind, index }));
                    }
                    states.push(index);
                    let separator = cursor.bump();
                    match separator.tok {
                        Tok::Sym(',') => continue,
                        Tok::Sym(')') => break,
                        _ => return Err(separator.expected("`,` or `)` in the concat list")),
                    }
                }
                CellOutput::Concat(states)
            }
            _ => return Err(rule.expected("`concat(...)` or `unused` after `out =`")),
        };
        cursor.expect_end()?;
        section.output = Some(output);
        Ok(())
    }
}

/// `op(hI)`: one half of block `b`.
fn operand(cursor: &mut Cursor<'_>, kind: CellKind, b: usize, side: Side) -> Result<(usize, Op), SpecError> {
    let name = cursor.bump();
    let op = match name.tok {
        Tok::Word(word) if state_digits(word).is_none() => word.parse::<Op>().map_err(|err| name.pos.at(err))?,
        _ => return Err(name.expected("an op name")),
    };
    cursor.expect_sym('(', "`(` after op name")?;
    let (index, token) = cursor.state()?;
    let available = 2 + b;
    if index >= available {
        let err = SpecError::InputOutOfRange { cell: kind, block: b, side, index, available };
        return Err(token.pos.at(err));
    }
    cursor.expect_sym(')', "`)` after op input")?;
    Ok((index, op))
}

/// Where the input ends: just after its last character.
fn end_of_input(text: &str) -> Pos {
    let line = 1 + text.matches('\n').count();
    let last_line = text.rsplit('\n').next().unwrap_or("");
    Pos { line, column: last_line.trim_end_matches('\r').chars().count() + 1 }
}

#[cfg(test)]
mod tests {
    use expect_test::{expect, Expect};

    use super::*;

    fn parse_err(text: &str) -> SpecError {
        match CellSpec::from_text(text) {
            Ok(spec) => panic!("parsed, but should not have:\n{spec}"),
            Err(err) => err,
        }
    }

    /// A spec whose normal cell is `normal` and whose reduction cell is NASNet-A's.
    fn with_normal(normal: &str) -> String {
        format!("normal:\n{normal}reduction:\n  h2 = add(max_pool_3x3(h0), identity(h1))\n  out = unused\n")
    }

    fn hand_built_specs() -> Vec<CellSpec> {
        use Op::*;
        let every_op = Cell {
            blocks: Op::ALL
                .iter()
                .enumerate()
                .map(|(b, &op)| Block {
                    inputs: [b % (2 + b), (b * 7 + 1) % (2 + b)],
                    ops: [op, Op::ALL[(b + 5) % Op::ALL.len()]],
                    combine: Combine::ALL[b % 2],
                })
                .collect(),
            output: CellOutput::UnusedBlocks,
        };
        let concat_combines = Cell {
            blocks: vec![
                Block { inputs: [1, 0], ops: [Conv1x7Then7x1, DilConv3x3], combine: Combine::Concat },
                Block { inputs: [2, 2], ops: [MaxPool7x7, Conv1x1], combine: Combine::Concat },
                Block::add((3, Conv3x3), (0, MaxPool5x5)),
            ],
            output: CellOutput::Concat(vec![4, 0, 2]),
        };
        let single = Cell { blocks: vec![Block::add((0, Identity), (0, Identity))], output: CellOutput::UnusedBlocks };
        vec![
            CellSpec { normal: every_op.clone(), reduction: concat_combines.clone() },
            CellSpec { normal: concat_combines, reduction: single.clone() },
            CellSpec { normal: single, reduction: every_op },
        ]
    }

    #[test]
    fn nasnet_a_text_golden() {
        expect![[r#"
            # NASNet cell spec (nas-space text form)
            # h0 = h_i (previous cell after the preamble), h1 = h_{i-1} (cell before that, adjusted),
            # h2.. = block outputs; a block is `hK = combine(op(hI), op(hJ))`
            version 1
            normal:
              h2 = add(sep_conv_5x5(h0), sep_conv_3x3(h1))
              h3 = add(sep_conv_5x5(h1), sep_conv_3x3(h1))
              h4 = add(avg_pool_3x3(h0), identity(h1))
              h5 = add(avg_pool_3x3(h1), avg_pool_3x3(h1))
              h6 = add(sep_conv_3x3(h0), identity(h0))
              out = concat(h1, h2, h3, h4, h5, h6)
            reduction:
              h2 = add(sep_conv_5x5(h0), sep_conv_7x7(h1))
              h3 = add(max_pool_3x3(h0), sep_conv_7x7(h1))
              h4 = add(avg_pool_3x3(h0), sep_conv_5x5(h1))
              h5 = add(identity(h3), avg_pool_3x3(h2))
              h6 = add(sep_conv_3x3(h2), max_pool_3x3(h0))
              out = concat(h3, h4, h5, h6)
        "#]]
        .assert_eq(&CellSpec::nasnet_a().to_text());
    }

    #[test]
    fn display_and_to_text_agree() {
        let spec = CellSpec::nasnet_a();
        assert_eq!(spec.to_text(), format!("{spec}"));
        assert!(spec.to_text().ends_with("out = concat(h3, h4, h5, h6)\n"));
    }

    #[test]
    fn nasnet_a_round_trips() {
        let spec = CellSpec::nasnet_a();
        assert_eq!(CellSpec::from_text(&spec.to_text()).unwrap(), spec);
        assert_eq!(spec.to_text().parse::<CellSpec>().unwrap(), spec);
    }

    #[test]
    fn hand_built_cells_round_trip() {
        for spec in hand_built_specs() {
            spec.validate().unwrap();
            let text = spec.to_text();
            assert_eq!(CellSpec::from_text(&text).unwrap(), spec, "text:\n{text}");
        }
    }

    #[test]
    fn unused_output_and_concat_combine_print_as_documented() {
        let spec = &hand_built_specs()[1];
        let text = spec.to_text();
        assert!(text.contains("  h2 = concat(conv_1x7_7x1(h1), dil_conv_3x3(h0))\n"), "{text}");
        assert!(text.contains("  out = concat(h4, h0, h2)\nreduction:\n"), "{text}");
        assert!(text.ends_with("  h2 = add(identity(h0), identity(h0))\n  out = unused\n"), "{text}");
    }

    #[test]
    fn free_layout_parses() {
        // No version line, reduction first, comments, odd spacing, bare state numbers,
        // CRLF line ends, aliases and upper-case op names.
        let text = "\r\n  # leading comment\r\nreduction :   # trailing comment\r\n\
                    h2=add( max_pool_3x3 (0) ,identity(h1))\r\n\r\n\
                    out=unused\r\n\
                    normal:\n\
                    \th2 = cat(SEP_CONV_3X3(h1), skip_connect(1))   \n\
                    h3   =   sum(avg_pool_3x3(2), 1x1(h0))\n\
                    out = concat(3, h2)";
        let spec = CellSpec::from_text(text).unwrap();
        let expected = CellSpec {
            normal: Cell {
                blocks: vec![
                    Block { inputs: [1, 1], ops: [Op::SepConv3x3, Op::Identity], combine: Combine::Concat },
                    Block::add((2, Op::AvgPool3x3), (0, Op::Conv1x1)),
                ],
                output: CellOutput::Concat(vec![3, 2]),
            },
            reduction: Cell {
                blocks: vec![Block::add((0, Op::MaxPool3x3), (1, Op::Identity))],
                output: CellOutput::UnusedBlocks,
            },
        };
        assert_eq!(spec, expected);
    }

    #[test]
    fn tf_slim_aliases_parse() {
        let text = "\
            version 1
            normal:
              h2 = add(separable_5x5_2(h0), separable_3x3_2(h1))
              h3 = add(separable_5x5_2(h1), separable_3x3_2(h1))
              h4 = add(avg_pool_3x3(h0), none(h1))
              h5 = add(avg_pool_3x3(h1), avg_pool_3x3(h1))
              h6 = add(separable_3x3_2(h0), none(h0))
              out = concat(h1, h2, h3, h4, h5, h6)
            reduction:
              h2 = add(separable_5x5_2(h0), separable_7x7_2(h1))
              h3 = add(max_pool_3x3(h0), separable_7x7_2(h1))
              h4 = add(avg_pool_3x3(h0), separable_5x5_2(h1))
              h5 = add(none(h3), avg_pool_3x3(h2))
              h6 = add(separable_3x3_2(h2), max_pool_3x3(h0))
              out = concat(h3, h4, h5, h6)
        ";
        assert_eq!(CellSpec::from_text(text).unwrap(), CellSpec::nasnet_a());
    }

    /// Each malformed text and what reading it says: the kind of mistake (the typed error
    /// under its position), then the message with its line and column.
    #[test]
    fn parse_errors_name_the_mistake_and_point_at_it() {
        let block = "  h2 = add(identity(h0), identity(h1))\n";
        let nasnet = CellSpec::nasnet_a().to_text();
        let cases: Vec<(String, Expect)> = vec![
            (nasnet.replacen("sep_conv_5x5(h0)", "sep_conv_9x9(h0)", 1), expect!["UnknownOp: line 6, column 12: unknown op `sep_conv_9x9`; known ops: identity, conv_1x3_3x1, conv_1x7_7x1, dil_conv_3x3, avg_pool_3x3, max_pool_3x3, max_pool_5x5, max_pool_7x7, conv_1x1, conv_3x3, sep_conv_3x3, sep_conv_5x5, sep_conv_7x7"]),
            (with_normal("  h2 = mul(identity(h0), identity(h1))\n  out = unused\n"), expect!["UnknownCombine: line 2, column 8: unknown combine `mul`; known: add, concat"]),
            (with_normal(&format!("{block}  h3 = add(identity(h2), identity(h3))\n  out = unused\n")), expect!["InputOutOfRange: line 3, column 35: normal cell, block 1: right input 3 is out of range (block 1 may read states 0..=2)"]),
            (with_normal(&format!("{block}  out = concat()\n")), expect!["EmptyConcat: line 3, column 9: normal cell: the output concat list is empty"]),
            (with_normal(&format!("{block}  out = concat(h2, h3)\n")), expect!["ConcatOutOfRange: line 3, column 20: normal cell: output state 3 is out of range (the cell has states 0..=2)"]),
            (with_normal(&format!("{block}  out = concat(2, 1, h2)\n")), expect!["DuplicateConcat: line 3, column 22: normal cell: output state 2 is listed twice in the concat list"]),
            (with_normal("  out = unused\n"), expect!["NoBlocks: line 1, column 1: normal cell has no blocks"]),
            (format!("normal:\n{block}  out = unused\n  reduction:\n"), expect!["NoBlocks: line 4, column 3: reduction cell has no blocks"]),
            (nasnet.replace("version 1", "version 2"), expect!["FormatVersion: line 4, column 9: cell spec format version 2 is not supported (this build reads version 1)"]),
            (
                with_normal(&format!("{block}  h3 = add(identity(h0), identity(h1))\n  h5 = add(identity(h0), identity(h1))\n  out = unused\n")),
                expect!["Syntax: line 4, column 3: normal cell, block 2 must define h4, found h5"],
            ),
            (with_normal("  h2 = add(identity h0, identity(h1))\n  out = unused\n"), expect!["Syntax: line 2, column 21: expected `(` after op name, found `h0`"]),
            // A forgotten op name is a syntax error too, not an unknown op called `h0`.
            (with_normal("  h2 = add(h0, identity(h1))\n  out = unused\n"), expect!["Syntax: line 2, column 12: expected an op name, found `h0`"]),
            (with_normal("  h2 = add(identity(h0), identity(h1)\n  out = unused\n"), expect!["Syntax: line 2, column 38: expected `)` to close the block, found end of line"]),
            (format!("normal:\n{block}  out = unused\n"), expect!["Syntax: line 4, column 1: expected a `reduction:` section, found end of input"]),
            ("# nothing here".to_string(), expect!["Syntax: line 1, column 15: expected a `normal:` section, found end of input"]),
            (with_normal(block), expect!["Syntax: line 3, column 1: expected `out = concat(...)` or `out = unused` to end the normal cell, found `reduction:`"]),
            ("reduction:\n  h2 = add(identity(h0), identity(h1))".to_string(), expect!["Syntax: line 2, column 39: expected `out = concat(...)` or `out = unused` to end the reduction cell, found end of input"]),
            (format!("{}normal:\n{block}  out = unused\n", with_normal(&format!("{block}  out = unused\n"))), expect!["Syntax: line 7, column 1: duplicate `normal:` section"]),
            (with_normal(&format!("{block}  out = unused\n{block}")), expect!["Syntax: line 4, column 3: normal cell: block `h2` comes after the `out` line, which must be last"]),
            (with_normal(&format!("{block}  out = unused\n  out = concat(h2)\n")), expect!["Syntax: line 4, column 3: the normal cell already has an `out` line"]),
            ("verison 1\n".to_string(), expect!["Syntax: line 1, column 1: expected `version`, `normal:` or `reduction:`, found `verison`"]),
            (with_normal(&format!("{block}  output = unused\n")), expect!["Syntax: line 3, column 3: expected a block `hK = ...`, an `out = ...` line or a section header, found `output`"]),
            (with_normal("  h2 = add(identity(h0); identity(h1))\n  out = unused\n"), expect!["Syntax: line 2, column 24: expected `,` between the two ops, found `;`"]),
            ("normal\n".to_string(), expect!["Syntax: line 1, column 7: expected `:` after `normal`, found end of line"]),
            (format!("version 1\n{nasnet}"), expect!["Syntax: line 5, column 1: duplicate `version` line"]),
            (format!("{}version 1\n", with_normal(&format!("{block}  out = unused\n"))), expect!["Syntax: line 7, column 1: `version` must come before the sections"]),
        ];
        for (text, expected) in cases {
            let err = parse_err(&text);
            let kind = format!("{:?}", err.kind());
            let kind = kind.split([' ', '{', '(']).next().unwrap_or_default();
            expected.assert_eq(&format!("{kind}: {err}"));
        }
    }
}
