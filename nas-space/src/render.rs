//! Drawings of cells: Graphviz DOT text, and SVG laid out in pure Rust.
//!
//! A cell is drawn the way the paper's Figure 4 draws NASNet-A: the two cell inputs
//! on top (state 0 is h_i, state 1 is h_{i-1}, TF-Slim's numbering), one box per op,
//! one ellipse per block joining its two ops (labelled with the state it produces),
//! and the output concat at the bottom with an edge from every state it concatenates.
//! In a reduction cell the ops that read a cell input run with stride 2 and say so
//! with a ` /2` suffix.
//!
//! [`cell_to_dot`] and [`spec_to_dot`] need no dependency; feed their output to
//! Graphviz (`dot -Tsvg`). [`cell_to_svg`] and [`spec_to_svg`] (feature `svg`) lay
//! the same graph out with the `layout-rs` crate, so no `dot` program is needed.
//! `layout-rs` does not draw clusters, so [`spec_to_svg`] lays each cell out on its
//! own and stacks the two drawings, each under a title, in one SVG document.

use std::fmt::Write as _;

use crate::{Cell, CellKind, CellSpec, Combine, Op, OpKind, Side};

/// The Graphviz DOT form of one cell: a `digraph` drawn top to bottom.
///
/// Node ids are stable: `n_h0` and `n_h1` for the cell inputs, `n_b{b}_left` and
/// `n_b{b}_right` for the ops of block b, `n_b{b}` for its combine (state 2 + b) and
/// `n_out` for the output concat. The cell is not validated: an invalid cell is drawn
/// as it is (an edge from a state that does not exist names a node Graphviz makes up).
pub fn cell_to_dot(cell: &Cell, kind: CellKind) -> String {
    let graph = CellGraph::new(cell, kind);
    let mut dot = String::new();
    let _ = writeln!(dot, "digraph {}_cell {{", graph.kind.name());
    write_graph_header(&mut dot, "  ");
    let _ = writeln!(dot, "  label={};", quote(&format!("{} cell", graph.kind)));
    dot.push_str("  labelloc=t;\n");
    write_cell_body(&mut dot, &graph, "", "  ");
    dot.push_str("}\n");
    dot
}

/// The Graphviz DOT form of both cells of a spec, in one `digraph`.
///
/// Each cell is a cluster (`cluster_normal`, `cluster_reduction`) labelled
/// "normal cell" / "reduction cell"; node ids are those of [`cell_to_dot`] prefixed
/// with `normal_` or `reduction_`, so they don't clash.
pub fn spec_to_dot(spec: &CellSpec) -> String {
    let mut dot = String::from("digraph cell_spec {\n");
    write_graph_header(&mut dot, "  ");
    for kind in CellKind::ALL {
        let graph = CellGraph::new(spec.cell(kind), kind);
        let _ = writeln!(dot, "  subgraph cluster_{} {{", kind.name());
        let _ = writeln!(dot, "    label={};", quote(&format!("{kind} cell")));
        dot.push_str("    style=rounded;\n    color=gray;\n");
        write_cell_body(&mut dot, &graph, &format!("{}_", kind.name()), "    ");
        dot.push_str("  }\n");
    }
    dot.push_str("}\n");
    dot
}

/// One cell drawn as a standalone SVG document (with a "normal cell" or
/// "reduction cell" title), laid out by `layout-rs`.
///
/// Validates the cell first. A layout failure is reported as [`SpecError::Shape`](crate::SpecError::Shape).
#[cfg(feature = "svg")]
pub fn cell_to_svg(cell: &Cell, kind: CellKind) -> Result<String, crate::SpecError> {
    cell.validate(kind)?;
    svg::render(&[CellGraph::new(cell, kind)])
}

/// Both cells of a spec in one SVG document: the normal cell above the reduction
/// cell, each under its title, each laid out on its own by `layout-rs`.
///
/// Validates the spec first. A layout failure is reported as [`SpecError::Shape`](crate::SpecError::Shape).
#[cfg(feature = "svg")]
pub fn spec_to_svg(spec: &CellSpec) -> Result<String, crate::SpecError> {
    spec.validate()?;
    let graphs: Vec<CellGraph> = CellKind::ALL.iter().map(|&kind| CellGraph::new(spec.cell(kind), kind)).collect();
    svg::render(&graphs)
}

/// What a node of a cell drawing stands for; decides its shape and colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeRole {
    /// State 0 or 1, a cell input.
    Input,
    /// One op of a block.
    Op(Op),
    /// The combine of a block: a new state.
    Combine,
    /// The output concat.
    Output,
}

impl NodeRole {
    /// Graphviz shape and style (kept to what `layout-rs` also reads).
    fn dot_shape(self) -> &'static str {
        match self {
            NodeRole::Input | NodeRole::Output => "shape=box, style=\"rounded,filled\"",
            NodeRole::Op(_) => "shape=box, style=filled",
            NodeRole::Combine => "shape=ellipse, style=filled",
        }
    }

    /// The fill colour, by CSS name (both Graphviz and `layout-rs` know these names).
    fn fill(self) -> &'static str {
        match self {
            NodeRole::Input | NodeRole::Output => "lightblue",
            NodeRole::Op(op) => match op.kind() {
                OpKind::Identity => "white",
                OpKind::Conv(_) => "moccasin",
                OpKind::SepConv { .. } => "lightyellow",
                OpKind::Pool { .. } => "palegreen",
            },
            NodeRole::Combine => "lightgray",
        }
    }
}

/// One node of a cell drawing.
#[derive(Debug, Clone)]
struct Node {
    id: String,
    label: String,
    role: NodeRole,
}

/// A cell as the nodes and edges of its drawing; both the DOT and the SVG forms
/// are written from this, so they always agree.
#[derive(Debug, Clone)]
struct CellGraph {
    kind: CellKind,
    nodes: Vec<Node>,
    /// `(from, to)` node ids, in drawing order.
    edges: Vec<(String, String)>,
}

impl CellGraph {
    /// Builds the drawing; never panics, even on an invalid cell.
    fn new(cell: &Cell, kind: CellKind) -> CellGraph {
        let mut nodes = vec![
            Node { id: state_id(0), label: "h0: h_i".to_string(), role: NodeRole::Input },
            Node { id: state_id(1), label: "h1: h_{i-1}".to_string(), role: NodeRole::Input },
        ];
        let mut edges = Vec::new();
        for (b, block) in cell.blocks.iter().enumerate() {
            for side in Side::BOTH {
                let (input, op) = (block.inputs[side.index()], block.ops[side.index()]);
                let id = format!("n_b{b}_{side}");
                let strided = kind == CellKind::Reduction && input < 2;
                let label = if strided { format!("{} /2", op.short_label()) } else { op.short_label().to_string() };
                nodes.push(Node { id: id.clone(), label, role: NodeRole::Op(op) });
                edges.push((state_id(input), id.clone()));
                edges.push((id, state_id(2 + b)));
            }
            let combine = match block.combine {
                Combine::Add => "+",
                Combine::Concat => "concat",
            };
            nodes.push(Node { id: state_id(2 + b), label: format!("h{} ({combine})", 2 + b), role: NodeRole::Combine });
        }
        nodes.push(Node { id: "n_out".to_string(), label: "output: concat".to_string(), role: NodeRole::Output });
        for state in cell.output_states() {
            edges.push((state_id(state), "n_out".to_string()));
        }
        CellGraph { kind, nodes, edges }
    }
}

/// The node id of a state: `n_h0`, `n_h1` for the cell inputs, `n_b{b}` for block b.
fn state_id(state: usize) -> String {
    match state {
        0 | 1 => format!("n_h{state}"),
        _ => format!("n_b{}", state - 2),
    }
}

/// Graph-wide attributes shared by both DOT forms.
fn write_graph_header(dot: &mut String, indent: &str) {
    let _ = writeln!(dot, "{indent}rankdir=TB;");
    let _ = writeln!(dot, "{indent}nodesep=0.3;");
    let _ = writeln!(dot, "{indent}ranksep=0.4;");
    let _ = writeln!(dot, "{indent}fontname=\"Helvetica\";");
    let _ = writeln!(dot, "{indent}node [fontname=\"Helvetica\", fontsize=12];");
    let _ = writeln!(dot, "{indent}edge [color=dimgray];");
}

/// The node and edge statements of one cell, with ids prefixed by `prefix`.
fn write_cell_body(dot: &mut String, graph: &CellGraph, prefix: &str, indent: &str) {
    for node in &graph.nodes {
        let (label, shape, fill) = (quote(&node.label), node.role.dot_shape(), node.role.fill());
        let _ = writeln!(dot, "{indent}{prefix}{} [label={label}, {shape}, fillcolor={fill}];", node.id);
    }
    for (from, to) in &graph.edges {
        let _ = writeln!(dot, "{indent}{prefix}{from} -> {prefix}{to};");
    }
}

/// A DOT double-quoted string: backslashes and quotes escaped, newlines as `\n`.
fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => {}
            _ => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Layout with `layout-rs` and SVG output through its `SVGWriter`.
#[cfg(feature = "svg")]
mod svg {
    use std::collections::HashMap;
    use std::panic::{catch_unwind, AssertUnwindSafe};

    use layout::backends::svg::SVGWriter;
    use layout::core::base::Orientation;
    use layout::core::color::Color;
    use layout::core::format::{ClipHandle, RenderBackend};
    use layout::core::geometry::{Point, Position};
    use layout::core::style::{LineStyleKind, StyleAttr};
    use layout::std_shapes::shapes::{Arrow, Element, LineEndKind, ShapeKind};
    use layout::topo::layout::VisualGraph;

    use super::{CellGraph, NodeRole};
    use crate::SpecError;

    /// Font size of node labels, in px.
    const FONT: usize = 14;
    /// Font size of the cell titles, in px.
    const TITLE_FONT: usize = 20;
    /// Estimated width of one character, as a fraction of the font size (generous
    /// for the serif font `SVGWriter` uses).
    const CHAR_WIDTH: f64 = 0.6;
    /// Space between neighbouring nodes of a rank, and between ranks, in px.
    const NODE_GAP: f64 = 24.;
    const RANK_GAP: f64 = 44.;
    /// Blank border around the document, and height of a title band, in px.
    const MARGIN: f64 = 16.;
    const TITLE_BAND: f64 = 36.;
    /// Space between the two cell drawings, in px.
    const CELL_GAP: f64 = 28.;

    /// Lays every graph out on its own and stacks the drawings top to bottom, each
    /// under its title, in one SVG document.
    pub(super) fn render(graphs: &[CellGraph]) -> Result<String, SpecError> {
        let drawings = graphs.iter().map(lay_out).collect::<Result<Vec<_>, _>>()?;
        let width = drawings.iter().map(|d| d.max.x - d.min.x).fold(0., f64::max) + 2. * MARGIN;
        let mut svg = SVGWriter::new();
        let mut top = MARGIN;
        for (graph, drawing) in graphs.iter().zip(&drawings) {
            let title = format!("{} cell", graph.kind);
            let title_look = StyleAttr::new(Color::fast("black"), 1, None, 0, TITLE_FONT);
            svg.draw_text(Point::new(width / 2., top + TITLE_BAND / 2.), &title, &title_look);
            top += TITLE_BAND;
            let drawing_width = drawing.max.x - drawing.min.x;
            let offset = Point::new((width - drawing_width) / 2. - drawing.min.x, top - drawing.min.y);
            drawing.replay(&mut svg, offset);
            top += drawing.max.y - drawing.min.y + CELL_GAP;
        }
        let height = top - CELL_GAP + MARGIN;
        set_document_size(&svg.finalize(), width, height)
    }

    /// Replaces the `<svg>` tag `SVGWriter` sized by its own estimate with one of
    /// the given size, on a white background.
    fn set_document_size(document: &str, width: f64, height: f64) -> Result<String, SpecError> {
        let start = document.find("<svg").ok_or_else(|| shape_error("the SVG writer wrote no <svg> tag"))?;
        let end = start
            + document[start..]
                .find('>')
                .ok_or_else(|| shape_error("the SVG writer wrote an unterminated <svg> tag"))?;
        let (width, height) = (width.ceil(), height.ceil());
        Ok(format!(
            "{}<svg width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" \
             xmlns=\"http://www.w3.org/2000/svg\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>{}",
            &document[..start],
            &document[end + 1..]
        ))
    }

    fn shape_error(message: impl Into<String>) -> SpecError {
        SpecError::Shape { message: message.into() }
    }

    /// Builds the `layout-rs` graph of one cell and lays it out into a recording.
    fn lay_out(graph: &CellGraph) -> Result<Recording, SpecError> {
        // `GraphBuilder` gives shapes the flipped orientation in a top-to-bottom graph.
        let dir = Orientation::TopToBottom;
        let mut vg = VisualGraph::new(dir);
        let mut handles = HashMap::new();
        for node in &graph.nodes {
            let look = StyleAttr::new(Color::fast("black"), 1, Some(Color::fast(node.role.fill())), 0, FONT);
            let text = text_size(&node.label, FONT);
            let (shape, size) = match node.role {
                NodeRole::Combine => (ShapeKind::new_circle(&node.label), Point::new(text.x * 1.2 + 24., text.y + 16.)),
                _ => (ShapeKind::new_box(&node.label), Point::new(text.x + 20., text.y + 14.)),
            };
            let mut element = Element::create(shape, look, dir.flip(), size);
            element.pos = Position::new(Point::zero(), size, Point::zero(), Point::new(NODE_GAP, RANK_GAP));
            handles.insert(node.id.as_str(), vg.add_node(element));
        }
        let edge_look = StyleAttr::new(Color::fast("dimgray"), 1, None, 0, FONT);
        for (from, to) in &graph.edges {
            let (Some(&from_handle), Some(&to_handle)) = (handles.get(from.as_str()), handles.get(to.as_str())) else {
                return Err(shape_error(format!("{} cell: edge {from} -> {to} names a missing node", graph.kind)));
            };
            let arrow =
                Arrow::new(LineEndKind::None, LineEndKind::Arrow, LineStyleKind::Normal, "", &edge_look, &None, &None);
            vg.add_edge(arrow, from_handle, to_handle);
        }
        // `layout-rs` asserts its invariants instead of returning errors; a broken one
        // becomes an error here rather than a panic in the caller.
        catch_unwind(AssertUnwindSafe(move || {
            let mut recording = Recording::default();
            vg.do_it(false, false, false, &mut recording);
            recording
        }))
        .map_err(|payload| {
            let reason = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            shape_error(format!("layout of the {} cell failed: {reason}", graph.kind))
        })
    }

    /// Width and height of a label in px, by the estimate the layout uses.
    fn text_size(text: &str, font: usize) -> Point {
        let chars = text.lines().map(|line| line.chars().count()).max().unwrap_or(0).max(1);
        let lines = text.lines().count().max(1);
        Point::new(chars as f64 * font as f64 * CHAR_WIDTH, (lines * font) as f64)
    }

    /// One draw call of `layout-rs`, kept to be replayed at an offset.
    #[derive(Debug, Clone)]
    enum Call {
        Rect {
            xy: Point,
            size: Point,
            look: StyleAttr,
            properties: Option<String>,
            clip: Option<ClipHandle>,
        },
        Line {
            start: Point,
            stop: Point,
            look: StyleAttr,
            properties: Option<String>,
        },
        Circle {
            xy: Point,
            size: Point,
            look: StyleAttr,
            properties: Option<String>,
        },
        Text {
            xy: Point,
            text: String,
            look: StyleAttr,
        },
        Arrow {
            path: Vec<(Point, Point)>,
            dashed: bool,
            head: (bool, bool),
            look: StyleAttr,
            properties: Option<String>,
            text: String,
        },
        Clip {
            xy: Point,
            size: Point,
            rounded_px: usize,
        },
    }

    /// A drawing as its draw calls and their bounding box.
    #[derive(Debug)]
    struct Recording {
        calls: Vec<Call>,
        min: Point,
        max: Point,
    }

    impl Default for Recording {
        fn default() -> Self {
            Recording { calls: Vec::new(), min: Point::splat(f64::INFINITY), max: Point::splat(f64::NEG_INFINITY) }
        }
    }

    impl Recording {
        fn grow(&mut self, low: Point, high: Point) {
            self.min = Point::new(self.min.x.min(low.x), self.min.y.min(low.y));
            self.max = Point::new(self.max.x.max(high.x), self.max.y.max(high.y));
        }

        /// Draws the recording into `rb`, moved by `offset`.
        fn replay(&self, rb: &mut dyn RenderBackend, offset: Point) {
            let mut clips = Vec::new();
            let clip_of = |clips: &Vec<ClipHandle>, clip: Option<ClipHandle>| clip.and_then(|c| clips.get(c).copied());
            for call in &self.calls {
                match call {
                    Call::Rect { xy, size, look, properties, clip } => {
                        rb.draw_rect(xy.add(offset), *size, look, properties.clone(), clip_of(&clips, *clip))
                    }
                    Call::Line { start, stop, look, properties } => {
                        rb.draw_line(start.add(offset), stop.add(offset), look, properties.clone())
                    }
                    Call::Circle { xy, size, look, properties } => {
                        rb.draw_circle(xy.add(offset), *size, look, properties.clone())
                    }
                    Call::Text { xy, text, look } => rb.draw_text(xy.add(offset), text, look),
                    Call::Arrow { path, dashed, head, look, properties, text } => {
                        let path: Vec<_> = path.iter().map(|(a, b)| (a.add(offset), b.add(offset))).collect();
                        rb.draw_arrow(&path, *dashed, *head, look, properties.clone(), text)
                    }
                    Call::Clip { xy, size, rounded_px } => {
                        clips.push(rb.create_clip(xy.add(offset), *size, *rounded_px))
                    }
                }
            }
        }
    }

    impl RenderBackend for Recording {
        fn draw_rect(
            &mut self,
            xy: Point,
            size: Point,
            look: &StyleAttr,
            properties: Option<String>,
            clip: Option<ClipHandle>,
        ) {
            self.grow(xy, xy.add(size));
            self.calls.push(Call::Rect { xy, size, look: look.clone(), properties, clip });
        }

        fn draw_line(&mut self, start: Point, stop: Point, look: &StyleAttr, properties: Option<String>) {
            self.grow(start, start);
            self.grow(stop, stop);
            self.calls.push(Call::Line { start, stop, look: look.clone(), properties });
        }

        fn draw_circle(&mut self, xy: Point, size: Point, look: &StyleAttr, properties: Option<String>) {
            self.grow(xy.sub(size.scale(0.5)), xy.add(size.scale(0.5)));
            self.calls.push(Call::Circle { xy, size, look: look.clone(), properties });
        }

        fn draw_text(&mut self, xy: Point, text: &str, look: &StyleAttr) {
            let half = text_size(text, look.font_size).scale(0.5);
            self.grow(xy.sub(half), xy.add(half));
            self.calls.push(Call::Text { xy, text: text.to_string(), look: look.clone() });
        }

        fn draw_arrow(
            &mut self,
            path: &[(Point, Point)],
            dashed: bool,
            head: (bool, bool),
            look: &StyleAttr,
            properties: Option<String>,
            text: &str,
        ) {
            // A cubic Bézier stays inside the hull of its control points.
            for (a, b) in path {
                self.grow(*a, *a);
                self.grow(*b, *b);
            }
            let path = path.to_vec();
            self.calls.push(Call::Arrow { path, dashed, head, look: look.clone(), properties, text: text.to_string() });
        }

        fn create_clip(&mut self, xy: Point, size: Point, rounded_px: usize) -> ClipHandle {
            self.calls.push(Call::Clip { xy, size, rounded_px });
            self.calls.iter().filter(|call| matches!(call, Call::Clip { .. })).count() - 1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Block, CellOutput};

    fn count(haystack: &str, needle: &str) -> usize {
        haystack.matches(needle).count()
    }

    /// Number of `<text>` elements (not counting `<textPath>`).
    #[cfg(feature = "svg")]
    fn texts(svg: &str) -> usize {
        count(svg, "<text ") + count(svg, "<text>")
    }

    /// Lines of a DOT text that are edge statements.
    fn edge_lines(dot: &str) -> Vec<&str> {
        dot.lines().map(str::trim).filter(|line| line.contains(" -> ")).collect()
    }

    /// A cell with a concat combine, a block reading another block, and the paper's
    /// "unused blocks" output rule.
    fn concat_cell() -> Cell {
        Cell {
            blocks: vec![
                Block { inputs: [0, 1], ops: [Op::Conv1x7Then7x1, Op::MaxPool5x5], combine: Combine::Concat },
                Block::add((2, Op::DilConv3x3), (0, Op::Identity)),
                Block { inputs: [1, 1], ops: [Op::Conv3x3, Op::Conv1x1], combine: Combine::Concat },
            ],
            output: CellOutput::UnusedBlocks,
        }
    }

    #[test]
    fn nasnet_a_normal_dot() {
        let cell = Cell::nasnet_a_normal();
        let dot = cell_to_dot(&cell, CellKind::Normal);
        assert!(dot.starts_with("digraph normal_cell {\n"), "{dot}");
        assert!(dot.contains("rankdir=TB;"));
        assert!(dot.contains("n_h0 [label=\"h0: h_i\""));
        assert!(dot.contains("n_h1 [label=\"h1: h_{i-1}\""));
        assert!(dot.contains("n_out [label=\"output: concat\""));
        assert_eq!(count(&dot, "_left [label="), 5);
        assert_eq!(count(&dot, "_right [label="), 5);
        assert_eq!(count(&dot, "shape=ellipse"), 5);
        for b in 0..5 {
            assert!(dot.contains(&format!("n_b{b} [label=\"h{} (+)\"", b + 2)), "{dot}");
        }
        assert!(dot.contains("n_b0_left [label=\"sep 5x5\""));
        assert!(dot.contains("n_b4_right [label=\"identity\""));
        assert!(!dot.contains("/2"), "a normal cell has no strided op");
        let edges = edge_lines(&dot);
        assert_eq!(edges.len(), 5 * 4 + 6);
        let out: Vec<_> = edges.iter().filter(|e| e.ends_with("-> n_out;")).copied().collect();
        assert_eq!(
            out,
            [
                "n_h1 -> n_out;",
                "n_b0 -> n_out;",
                "n_b1 -> n_out;",
                "n_b2 -> n_out;",
                "n_b3 -> n_out;",
                "n_b4 -> n_out;"
            ]
        );
        assert!(edges.contains(&"n_h0 -> n_b0_left;"));
        assert!(edges.contains(&"n_h1 -> n_b0_right;"));
        assert!(edges.contains(&"n_b0_left -> n_b0;"));
        assert!(edges.contains(&"n_b0_right -> n_b0;"));
    }

    #[test]
    fn nasnet_a_reduction_dot_marks_strided_ops() {
        let cell = Cell::nasnet_a_reduction();
        let dot = cell_to_dot(&cell, CellKind::Reduction);
        assert_eq!(count(&dot, "_left [label=") + count(&dot, "_right [label="), 10);
        // Blocks 0..=2 read h0 and h1 on both sides, block 4's right op reads h0.
        assert_eq!(count(&dot, " /2\""), 7);
        for strided in ["n_b0_left", "n_b0_right", "n_b1_left", "n_b1_right", "n_b2_left", "n_b2_right", "n_b4_right"] {
            assert!(dot.lines().any(|l| l.trim().starts_with(strided) && l.contains(" /2\"")), "{strided}: {dot}");
        }
        assert!(dot.contains("n_b3_left [label=\"identity\""));
        assert!(dot.contains("n_b4_left [label=\"sep 3x3\""));
        assert!(dot.contains("n_b1_left [label=\"max 3x3 /2\""));
        let edges = edge_lines(&dot);
        assert_eq!(edges.len(), 5 * 4 + 4);
        let out: Vec<_> = edges.iter().filter(|e| e.ends_with("-> n_out;")).copied().collect();
        assert_eq!(out, ["n_b1 -> n_out;", "n_b2 -> n_out;", "n_b3 -> n_out;", "n_b4 -> n_out;"]);
        assert!(edges.contains(&"n_b1 -> n_b3_left;"), "block 3 reads h3");
        assert!(edges.contains(&"n_b0 -> n_b3_right;"), "block 3 reads h2");
    }

    #[test]
    fn spec_dot_has_two_clusters_with_prefixed_ids() {
        let dot = spec_to_dot(&CellSpec::nasnet_a());
        assert!(dot.starts_with("digraph cell_spec {\n"));
        assert!(dot.contains("subgraph cluster_normal {\n    label=\"normal cell\";"));
        assert!(dot.contains("subgraph cluster_reduction {\n    label=\"reduction cell\";"));
        assert_eq!(count(&dot, "shape=box, style=filled"), 20);
        assert_eq!(count(&dot, " /2\""), 7);
        assert!(dot.contains("normal_n_h0 -> normal_n_b0_left;"));
        assert!(dot.contains("reduction_n_b4 -> reduction_n_out;"));
        let edges = edge_lines(&dot);
        assert_eq!(edges.len(), 26 + 24);
        for edge in &edges {
            let (from, to) = edge.trim_end_matches(';').split_once(" -> ").unwrap();
            let prefix = if from.starts_with("normal_") { "normal_" } else { "reduction_" };
            assert!(from.starts_with(prefix) && to.starts_with(prefix), "{edge}");
        }
    }

    #[test]
    fn concat_cell_dot() {
        let cell = concat_cell();
        let dot = cell_to_dot(&cell, CellKind::Reduction);
        assert!(dot.contains("n_b0 [label=\"h2 (concat)\""));
        assert!(dot.contains("n_b1 [label=\"h3 (+)\""));
        assert!(dot.contains("n_b1_left [label=\"dil 3x3\""), "reads h2, so stride 1");
        assert!(dot.contains("n_b1_right [label=\"identity /2\""));
        assert!(dot.contains("n_b2_left [label=\"conv 3x3 /2\""));
        // Blocks 1 and 2 are unused (block 0 is read by block 1).
        let out: Vec<_> = edge_lines(&dot).into_iter().filter(|e| e.ends_with("-> n_out;")).collect();
        assert_eq!(out, ["n_b1 -> n_out;", "n_b2 -> n_out;"]);
    }

    #[test]
    fn dot_of_an_invalid_cell_does_not_panic() {
        let cell =
            Cell { blocks: vec![Block::add((7, Op::Conv3x3), (0, Op::Identity))], output: CellOutput::Concat(vec![9]) };
        let dot = cell_to_dot(&cell, CellKind::Normal);
        assert!(dot.contains("n_b5 -> n_b0_left;"));
        assert!(dot.contains("n_b7 -> n_out;"));
        let empty = Cell { blocks: vec![], output: CellOutput::UnusedBlocks };
        assert!(cell_to_dot(&empty, CellKind::Reduction).contains("n_out"));
    }

    #[test]
    fn quote_escapes() {
        assert_eq!(quote("a \"b\" \\ c\nd"), "\"a \\\"b\\\" \\\\ c\\nd\"");
    }

    #[cfg(feature = "svg")]
    mod svg {
        use layout::backends::svg::SVGWriter;
        use layout::gv::{DotParser, GraphBuilder};

        use super::*;
        use crate::SpecError;

        /// Parses DOT with `layout-rs`, builds its graph and lays it out.
        fn layout_dot(dot: &str) -> String {
            let graph = DotParser::new(dot).process().unwrap_or_else(|e| panic!("{e}\n{dot}"));
            let mut builder = GraphBuilder::new();
            builder.visit_graph(&graph);
            let mut vg = builder.get();
            assert!(vg.num_nodes() > 0);
            let mut svg = SVGWriter::new();
            vg.do_it(false, false, false, &mut svg);
            svg.finalize()
        }

        #[test]
        fn dot_parses_with_layout_rs() {
            let spec = CellSpec::nasnet_a();
            for kind in CellKind::ALL {
                let svg = layout_dot(&cell_to_dot(spec.cell(kind), kind));
                assert!(svg.contains(">h1: h_{i-1}<"));
                assert!(svg.contains(">output: concat<"));
            }
            let svg = layout_dot(&spec_to_dot(&spec));
            // Both cells' nodes are there: 18 each.
            assert_eq!(count(&svg, "<tspan"), 36);
            assert_eq!(count(&svg, ">sep 7x7 /2<"), 2);
            layout_dot(&cell_to_dot(&concat_cell(), CellKind::Normal));
        }

        /// The labels of every node (none needs XML escaping).
        fn labels(cell: &Cell, kind: CellKind) -> Vec<String> {
            CellGraph::new(cell, kind).nodes.into_iter().map(|n| n.label).collect()
        }

        fn assert_well_formed(svg: &str) {
            assert!(svg.starts_with("<?xml"), "{}", &svg[..80.min(svg.len())]);
            assert_eq!(count(svg, "<svg "), 1);
            assert!(svg.ends_with("</svg>"));
            assert_eq!(texts(svg), count(svg, "</text>"));
            assert_eq!(count(svg, "<g "), count(svg, "</g>"));
            let tag = &svg[svg.find("<svg ").unwrap()..];
            let tag = &tag[..tag.find('>').unwrap()];
            let attr = |name: &str| -> f64 {
                let rest = &tag[tag.find(&format!(" {name}=\"")).unwrap() + name.len() + 3..];
                rest[..rest.find('"').unwrap()].parse().unwrap()
            };
            let (width, height) = (attr("width"), attr("height"));
            assert!(width > 100. && height > 100.);
            assert!(tag.contains(&format!("viewBox=\"0 0 {width} {height}\"")));
            // Every drawn coordinate lies inside the document.
            for x in svg.split(" x=\"").skip(1).chain(svg.split(" cx=\"").skip(1)) {
                let x: f64 = x[..x.find('"').unwrap()].parse().unwrap();
                assert!((0. ..=width).contains(&x), "x = {x} outside 0..{width}");
            }
            for y in svg.split(" y=\"").skip(1).chain(svg.split(" cy=\"").skip(1)) {
                let y: f64 = y[..y.find('"').unwrap()].parse().unwrap();
                assert!((0. ..=height).contains(&y), "y = {y} outside 0..{height}");
            }
        }

        #[test]
        fn nasnet_a_cell_svgs() {
            let spec = CellSpec::nasnet_a();
            // Nodes: 2 inputs + 5 × (2 ops + 1 combine) + output. Edges: 5 × 4 + outputs.
            for (kind, edges) in [(CellKind::Normal, 26), (CellKind::Reduction, 24)] {
                let cell = spec.cell(kind);
                let svg = cell_to_svg(cell, kind).unwrap();
                assert_well_formed(&svg);
                for label in labels(cell, kind) {
                    assert!(svg.contains(&format!(">{label}</tspan>")), "{label}");
                }
                assert_eq!(count(&svg, "<tspan"), 18 + 1, "node labels and the title");
                assert!(svg.contains(&format!(">{kind} cell</tspan>")));
                // `SVGWriter` gives every edge a (here empty) text on its path.
                assert_eq!(texts(&svg), 18 + 1 + edges);
                assert_eq!(count(&svg, "<textPath"), edges);
                assert_eq!(count(&svg, "marker-end=\"url(#endarrow)\""), edges);
                assert_eq!(count(&svg, "<rect"), 1 + 13, "background, 10 ops, 2 inputs, output");
                assert_eq!(count(&svg, "<ellipse"), 5);
            }
        }

        #[test]
        fn nasnet_a_spec_svg() {
            let spec = CellSpec::nasnet_a();
            let svg = spec_to_svg(&spec).unwrap();
            assert_well_formed(&svg);
            assert_eq!(count(&svg, "<tspan"), 2 * 18 + 2);
            assert_eq!(texts(&svg), 2 * 18 + 2 + 26 + 24);
            assert_eq!(count(&svg, "<svg "), 1);
            assert_eq!(count(&svg, "id=\"endarrow\""), 1, "one set of defs");
            for kind in CellKind::ALL {
                for label in labels(spec.cell(kind), kind) {
                    assert!(svg.contains(&format!(">{label}</tspan>")), "{label}");
                }
            }
            assert_eq!(count(&svg, " /2</tspan>"), 7);
            // Edge ids stay unique across the two drawings.
            for i in 0..50 {
                assert_eq!(count(&svg, &format!("id=\"arrow{i}\"")), 1);
            }
            // The normal cell's title is above the reduction cell's.
            assert!(svg.find(">normal cell<").unwrap() < svg.find(">reduction cell<").unwrap());
        }

        #[test]
        fn concat_cell_svg() {
            let cell = concat_cell();
            let svg = cell_to_svg(&cell, CellKind::Normal).unwrap();
            assert_well_formed(&svg);
            for label in ["h2 (concat)", "h3 (+)", "h4 (concat)", "1x7+7x1", "max 5x5", "conv 1x1"] {
                assert!(svg.contains(&format!(">{label}</tspan>")), "{label}");
            }
            // 2 inputs + 3 × 3 + output; 3 × 4 + 2 output edges.
            assert_eq!(texts(&svg), 12 + 1 + 14);
        }

        #[test]
        fn svg_validates_first() {
            let bad = Cell {
                blocks: vec![Block::add((2, Op::Conv3x3), (0, Op::Identity))],
                output: CellOutput::UnusedBlocks,
            };
            let err = cell_to_svg(&bad, CellKind::Reduction).unwrap_err();
            assert!(
                matches!(err, SpecError::InputOutOfRange { cell: CellKind::Reduction, block: 0, index: 2, .. }),
                "{err}"
            );
            let mut spec = CellSpec::nasnet_a();
            spec.reduction.output = CellOutput::Concat(vec![]);
            assert!(matches!(spec_to_svg(&spec), Err(SpecError::EmptyConcat { cell: CellKind::Reduction })));
        }

        /// Many random valid cells lay out without error (`layout-rs` asserts a lot).
        #[test]
        fn random_cells_render() {
            let mut seed = 0x2545_f491_4f6c_dd1d_u64;
            let mut next = |n: usize| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed % n as u64) as usize
            };
            for _ in 0..150 {
                let n_blocks = 1 + next(7);
                let blocks = (0..n_blocks)
                    .map(|b| Block {
                        inputs: [next(2 + b), next(2 + b)],
                        ops: [Op::ALL[next(13)], Op::ALL[next(13)]],
                        combine: Combine::ALL[next(2)],
                    })
                    .collect();
                let mut cell = Cell { blocks, output: CellOutput::UnusedBlocks };
                if next(2) == 0 {
                    let states: Vec<usize> = (0..cell.num_states()).filter(|_| next(3) == 0).collect();
                    if !states.is_empty() {
                        cell.output = CellOutput::Concat(states);
                    }
                }
                let kind = CellKind::ALL[next(2)];
                let svg = cell_to_svg(&cell, kind).unwrap_or_else(|e| panic!("{e}: {cell:?}"));
                let nodes = 3 + 3 * n_blocks;
                let edges = 4 * n_blocks + cell.output_states().len();
                assert_eq!(texts(&svg), nodes + 1 + edges, "{cell:?}");
                layout_dot(&cell_to_dot(&cell, kind));
            }
        }

        #[test]
        fn nasnet_a_svg_file() {
            let dir = std::env::temp_dir().join(format!("nas-space-render-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("nasnet_a.svg");
            std::fs::write(&path, spec_to_svg(&CellSpec::nasnet_a()).unwrap()).unwrap();
            let size = std::fs::metadata(&path).unwrap().len();
            std::fs::remove_dir_all(&dir).unwrap();
            assert!(size > 10_000, "{size} bytes");
        }
    }
}
