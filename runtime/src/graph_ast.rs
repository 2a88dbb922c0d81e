//! `graph.nnef`, parsed once by the packer instead of on every device.
//!
//! tract 0.23.9 parses the NNEF text with nom, through a dozen grammar
//! levels per literal: about 20 ms for a 57 KB graph on this machine, two
//! thirds of loading an NNEF model (scripts/bench_notes.md). The packer
//! already holds tract's own parse of that text, so it stores it in the tar
//! next to `graph.nnef` as the member `graph.nnef.ast`: a magic line, the
//! SHA-256 of the text it was parsed from, and the document in postcard.
//! A device decodes that in well under a millisecond.
//!
//! The text stays in the tar and stays the reference: a stored document is
//! used only when the text's digest matches, so a tar whose `graph.nnef`
//! was edited after packing, one from an older packer, or one this version
//! cannot decode, is parsed from the text as before. tract's own reader
//! ignores the extra member (no resource loader claims the name), so the
//! tar still loads in tract-cli and older agents.
//!
//! The types below mirror `tract_nnef::ast` field for field; they exist
//! because tract's AST does not implement serde. The packer checks that
//! the document survives the round trip exactly (`PartialEq` on tract's
//! types) before storing it.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tract_nnef::ast;

/// The tar member holding the pre-parsed document.
pub const MEMBER: &str = "graph.nnef.ast";

/// First bytes of the member; a later layout gets a new magic, and a
/// device that does not know it parses the text instead.
const MAGIC: &[u8] = b"edgefleet nnef ast 1\n";

#[derive(Serialize, Deserialize)]
struct Stored {
    /// SHA-256 of the `graph.nnef` text the document was parsed from.
    graph_sha256: [u8; 32],
    doc: Document,
}

/// The member's bytes for `doc`, parsed from `text`, or `None` when the
/// document does not survive the round trip unchanged (then the tar goes
/// out without the member and devices parse the text).
pub fn encode(text: &str, doc: &ast::Document) -> Option<Vec<u8>> {
    let stored = Stored {
        graph_sha256: Sha256::digest(text.as_bytes()).into(),
        doc: Document::from(doc),
    };
    let mut bytes = MAGIC.to_vec();
    bytes.extend(postcard::to_allocvec(&stored).ok()?);
    (decode(&bytes, text).as_ref() == Some(doc)).then_some(bytes)
}

/// The document stored in `member`, if it was parsed from exactly `text`
/// and this version can read it.
pub fn decode(member: &[u8], text: &str) -> Option<ast::Document> {
    let body = member.strip_prefix(MAGIC)?;
    let stored: Stored = postcard::from_bytes(body).ok()?;
    let digest: [u8; 32] = Sha256::digest(text.as_bytes()).into();
    (stored.graph_sha256 == digest).then(|| stored.doc.into())
}

#[derive(Serialize, Deserialize)]
struct Document {
    version: String,
    extension: Vec<(String, String)>,
    fragments: Vec<FragmentDef>,
    graph_def: GraphDef,
}

#[derive(Serialize, Deserialize)]
enum TypeSpec {
    Single(TypeName),
    Tensor(TypeName),
    Array(Box<TypeSpec>),
    Tuple(Vec<TypeSpec>),
}

#[derive(Serialize, Deserialize, Clone, Copy)]
enum TypeName {
    Integer,
    Scalar,
    Logical,
    String,
    Any,
    /// tract's `Complex`, present only when its `complex` feature is on.
    Complex,
}

#[derive(Serialize, Deserialize)]
struct GraphDef {
    id: String,
    parameters: Vec<String>,
    results: Vec<String>,
    body: Vec<Assignment>,
}

#[derive(Serialize, Deserialize)]
struct FragmentDef {
    decl: FragmentDecl,
    body: Option<Vec<Assignment>>,
}

#[derive(Serialize, Deserialize)]
struct FragmentDecl {
    id: String,
    generic_decl: Option<Option<TypeName>>,
    parameters: Vec<Parameter>,
    results: Vec<ResultSpec>,
}

#[derive(Serialize, Deserialize)]
struct Parameter {
    id: String,
    spec: TypeSpec,
    lit: Option<Literal>,
    doc: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct ResultSpec {
    id: String,
    spec: TypeSpec,
}

#[derive(Serialize, Deserialize)]
struct Assignment {
    left: LValue,
    right: RValue,
}

#[derive(Serialize, Deserialize)]
enum LValue {
    Identifier(String),
    Array(Vec<LValue>),
    Tuple(Vec<LValue>),
}

#[derive(Serialize, Deserialize)]
struct Invocation {
    id: String,
    generic_type_name: Option<TypeName>,
    arguments: Vec<Argument>,
}

#[derive(Serialize, Deserialize)]
struct Argument {
    id: Option<String>,
    rvalue: RValue,
}

#[derive(Serialize, Deserialize)]
enum RValue {
    Identifier(String),
    Literal(Literal),
    Binary(Box<RValue>, String, Box<RValue>),
    Unary(String, Box<RValue>),
    Tuple(Vec<RValue>),
    Array(Vec<RValue>),
    Subscript(Box<RValue>, Box<Subscript>),
    Comprehension(Box<Comprehension>),
    IfThenElse(Box<IfThenElse>),
    Invocation(Invocation),
}

#[derive(Serialize, Deserialize)]
struct Comprehension {
    loop_iters: Vec<(String, RValue)>,
    filter: Option<RValue>,
    yields: RValue,
}

#[derive(Serialize, Deserialize)]
enum Subscript {
    Single(RValue),
    Range(Option<RValue>, Option<RValue>),
}

#[derive(Serialize, Deserialize)]
struct IfThenElse {
    cond: RValue,
    then: RValue,
    otherwise: RValue,
}

#[derive(Serialize, Deserialize)]
enum Literal {
    Numeric(String),
    String(String),
    Logical(bool),
    Array(Vec<Literal>),
    Tuple(Vec<Literal>),
}

// tract → stored form.

fn id(i: &ast::Identifier) -> String {
    i.0.clone()
}

fn all<'a, A: 'a, B: From<&'a A>>(v: &'a [A]) -> Vec<B> {
    v.iter().map(B::from).collect()
}

fn boxed<'a, A: 'a, B: From<&'a A>>(a: &'a A) -> Box<B> {
    Box::new(B::from(a))
}

impl From<&ast::Document> for Document {
    fn from(d: &ast::Document) -> Self {
        Document {
            version: d.version.clone(),
            extension: d
                .extension
                .iter()
                .map(|(i, s)| (id(i), s.clone()))
                .collect(),
            fragments: all(&d.fragments),
            graph_def: (&d.graph_def).into(),
        }
    }
}

impl From<&ast::TypeSpec> for TypeSpec {
    fn from(t: &ast::TypeSpec) -> Self {
        match t {
            ast::TypeSpec::Single(n) => TypeSpec::Single(n.into()),
            ast::TypeSpec::Tensor(n) => TypeSpec::Tensor(n.into()),
            ast::TypeSpec::Array(s) => TypeSpec::Array(boxed(&**s)),
            ast::TypeSpec::Tuple(v) => TypeSpec::Tuple(all(v)),
        }
    }
}

impl From<&ast::TypeName> for TypeName {
    fn from(n: &ast::TypeName) -> Self {
        match n {
            ast::TypeName::Integer => TypeName::Integer,
            ast::TypeName::Scalar => TypeName::Scalar,
            ast::TypeName::Logical => TypeName::Logical,
            ast::TypeName::String => TypeName::String,
            ast::TypeName::Any => TypeName::Any,
            // Only `Complex` is left, and only with tract's `complex`
            // feature.
            #[allow(unreachable_patterns)]
            _ => TypeName::Complex,
        }
    }
}

impl From<&ast::GraphDef> for GraphDef {
    fn from(g: &ast::GraphDef) -> Self {
        GraphDef {
            id: id(&g.id),
            parameters: g.parameters.iter().map(id).collect(),
            results: g.results.iter().map(id).collect(),
            body: all(&g.body),
        }
    }
}

impl From<&ast::FragmentDef> for FragmentDef {
    fn from(f: &ast::FragmentDef) -> Self {
        FragmentDef {
            decl: (&f.decl).into(),
            body: f.body.as_deref().map(all),
        }
    }
}

impl From<&ast::FragmentDecl> for FragmentDecl {
    fn from(d: &ast::FragmentDecl) -> Self {
        FragmentDecl {
            id: id(&d.id),
            generic_decl: d.generic_decl.map(|g| g.as_ref().map(TypeName::from)),
            parameters: all(&d.parameters),
            results: all(&d.results),
        }
    }
}

impl From<&ast::Parameter> for Parameter {
    fn from(p: &ast::Parameter) -> Self {
        Parameter {
            id: id(&p.id),
            spec: (&p.spec).into(),
            lit: p.lit.as_ref().map(Literal::from),
            doc: p.doc.clone(),
        }
    }
}

impl From<&ast::Result_> for ResultSpec {
    fn from(r: &ast::Result_) -> Self {
        ResultSpec {
            id: id(&r.id),
            spec: (&r.spec).into(),
        }
    }
}

impl From<&ast::Assignment> for Assignment {
    fn from(a: &ast::Assignment) -> Self {
        Assignment {
            left: (&a.left).into(),
            right: (&a.right).into(),
        }
    }
}

impl From<&ast::LValue> for LValue {
    fn from(l: &ast::LValue) -> Self {
        match l {
            ast::LValue::Identifier(i) => LValue::Identifier(id(i)),
            ast::LValue::Array(v) => LValue::Array(all(v)),
            ast::LValue::Tuple(v) => LValue::Tuple(all(v)),
        }
    }
}

impl From<&ast::Invocation> for Invocation {
    fn from(i: &ast::Invocation) -> Self {
        Invocation {
            id: id(&i.id),
            generic_type_name: i.generic_type_name.as_ref().map(TypeName::from),
            arguments: all(&i.arguments),
        }
    }
}

impl From<&ast::Argument> for Argument {
    fn from(a: &ast::Argument) -> Self {
        Argument {
            id: a.id.as_ref().map(id),
            rvalue: (&a.rvalue).into(),
        }
    }
}

impl From<&ast::RValue> for RValue {
    fn from(r: &ast::RValue) -> Self {
        match r {
            ast::RValue::Identifier(i) => RValue::Identifier(id(i)),
            ast::RValue::Literal(l) => RValue::Literal(l.into()),
            ast::RValue::Binary(a, op, b) => RValue::Binary(boxed(&**a), op.clone(), boxed(&**b)),
            ast::RValue::Unary(op, a) => RValue::Unary(op.clone(), boxed(&**a)),
            ast::RValue::Tuple(v) => RValue::Tuple(all(v)),
            ast::RValue::Array(v) => RValue::Array(all(v)),
            ast::RValue::Subscript(a, s) => RValue::Subscript(boxed(&**a), boxed(&**s)),
            ast::RValue::Comprehension(c) => RValue::Comprehension(boxed(&**c)),
            ast::RValue::IfThenElse(c) => RValue::IfThenElse(boxed(&**c)),
            ast::RValue::Invocation(i) => RValue::Invocation(i.into()),
        }
    }
}

impl From<&ast::Comprehension> for Comprehension {
    fn from(c: &ast::Comprehension) -> Self {
        Comprehension {
            loop_iters: c
                .loop_iters
                .iter()
                .map(|(i, r)| (id(i), r.into()))
                .collect(),
            filter: c.filter.as_ref().map(RValue::from),
            yields: (&c.yields).into(),
        }
    }
}

impl From<&ast::Subscript> for Subscript {
    fn from(s: &ast::Subscript) -> Self {
        match s {
            ast::Subscript::Single(r) => Subscript::Single(r.into()),
            ast::Subscript::Range(a, b) => {
                Subscript::Range(a.as_ref().map(RValue::from), b.as_ref().map(RValue::from))
            }
        }
    }
}

impl From<&ast::IfThenElse> for IfThenElse {
    fn from(c: &ast::IfThenElse) -> Self {
        IfThenElse {
            cond: (&c.cond).into(),
            then: (&c.then).into(),
            otherwise: (&c.otherwise).into(),
        }
    }
}

impl From<&ast::Literal> for Literal {
    fn from(l: &ast::Literal) -> Self {
        match l {
            ast::Literal::Numeric(s) => Literal::Numeric(s.clone()),
            ast::Literal::String(s) => Literal::String(s.clone()),
            ast::Literal::Logical(b) => Literal::Logical(*b),
            ast::Literal::Array(v) => Literal::Array(all(v)),
            ast::Literal::Tuple(v) => Literal::Tuple(all(v)),
        }
    }
}

// Stored form → tract.

fn ident(s: String) -> ast::Identifier {
    ast::Identifier(s)
}

fn into_all<A, B: From<A>>(v: Vec<A>) -> Vec<B> {
    v.into_iter().map(B::from).collect()
}

fn unbox<A, B: From<A>>(a: A) -> Box<B> {
    Box::new(B::from(a))
}

impl From<Document> for ast::Document {
    fn from(d: Document) -> Self {
        ast::Document {
            version: d.version,
            extension: d
                .extension
                .into_iter()
                .map(|(i, s)| (ident(i), s))
                .collect(),
            fragments: into_all(d.fragments),
            graph_def: d.graph_def.into(),
        }
    }
}

impl From<TypeSpec> for ast::TypeSpec {
    fn from(t: TypeSpec) -> Self {
        match t {
            TypeSpec::Single(n) => ast::TypeSpec::Single(n.into()),
            TypeSpec::Tensor(n) => ast::TypeSpec::Tensor(n.into()),
            TypeSpec::Array(s) => ast::TypeSpec::Array(unbox(*s)),
            TypeSpec::Tuple(v) => ast::TypeSpec::Tuple(into_all(v)),
        }
    }
}

impl From<TypeName> for ast::TypeName {
    fn from(n: TypeName) -> Self {
        match n {
            TypeName::Integer => ast::TypeName::Integer,
            TypeName::Scalar => ast::TypeName::Scalar,
            TypeName::Logical => ast::TypeName::Logical,
            TypeName::String => ast::TypeName::String,
            TypeName::Any => ast::TypeName::Any,
            // Written only by a build with tract's `complex` feature; a
            // build without it cannot run such a graph anyway, and the
            // round-trip check would have left the member out.
            TypeName::Complex => ast::TypeName::Any,
        }
    }
}

impl From<GraphDef> for ast::GraphDef {
    fn from(g: GraphDef) -> Self {
        ast::GraphDef {
            id: ident(g.id),
            parameters: g.parameters.into_iter().map(ident).collect(),
            results: g.results.into_iter().map(ident).collect(),
            body: into_all(g.body),
        }
    }
}

impl From<FragmentDef> for ast::FragmentDef {
    fn from(f: FragmentDef) -> Self {
        ast::FragmentDef {
            decl: f.decl.into(),
            body: f.body.map(into_all),
        }
    }
}

impl From<FragmentDecl> for ast::FragmentDecl {
    fn from(d: FragmentDecl) -> Self {
        ast::FragmentDecl {
            id: ident(d.id),
            generic_decl: d.generic_decl.map(|g| g.map(ast::TypeName::from)),
            parameters: into_all(d.parameters),
            results: into_all(d.results),
        }
    }
}

impl From<Parameter> for ast::Parameter {
    fn from(p: Parameter) -> Self {
        ast::Parameter {
            id: ident(p.id),
            spec: p.spec.into(),
            lit: p.lit.map(ast::Literal::from),
            doc: p.doc,
        }
    }
}

impl From<ResultSpec> for ast::Result_ {
    fn from(r: ResultSpec) -> Self {
        ast::Result_ {
            id: ident(r.id),
            spec: r.spec.into(),
        }
    }
}

impl From<Assignment> for ast::Assignment {
    fn from(a: Assignment) -> Self {
        ast::Assignment {
            left: a.left.into(),
            right: a.right.into(),
        }
    }
}

impl From<LValue> for ast::LValue {
    fn from(l: LValue) -> Self {
        match l {
            LValue::Identifier(i) => ast::LValue::Identifier(ident(i)),
            LValue::Array(v) => ast::LValue::Array(into_all(v)),
            LValue::Tuple(v) => ast::LValue::Tuple(into_all(v)),
        }
    }
}

impl From<Invocation> for ast::Invocation {
    fn from(i: Invocation) -> Self {
        ast::Invocation {
            id: ident(i.id),
            generic_type_name: i.generic_type_name.map(ast::TypeName::from),
            arguments: into_all(i.arguments),
        }
    }
}

impl From<Argument> for ast::Argument {
    fn from(a: Argument) -> Self {
        ast::Argument {
            id: a.id.map(ident),
            rvalue: a.rvalue.into(),
        }
    }
}

impl From<RValue> for ast::RValue {
    fn from(r: RValue) -> Self {
        match r {
            RValue::Identifier(i) => ast::RValue::Identifier(ident(i)),
            RValue::Literal(l) => ast::RValue::Literal(l.into()),
            RValue::Binary(a, op, b) => ast::RValue::Binary(unbox(*a), op, unbox(*b)),
            RValue::Unary(op, a) => ast::RValue::Unary(op, unbox(*a)),
            RValue::Tuple(v) => ast::RValue::Tuple(into_all(v)),
            RValue::Array(v) => ast::RValue::Array(into_all(v)),
            RValue::Subscript(a, s) => ast::RValue::Subscript(unbox(*a), unbox(*s)),
            RValue::Comprehension(c) => ast::RValue::Comprehension(unbox(*c)),
            RValue::IfThenElse(c) => ast::RValue::IfThenElse(unbox(*c)),
            RValue::Invocation(i) => ast::RValue::Invocation(i.into()),
        }
    }
}

impl From<Comprehension> for ast::Comprehension {
    fn from(c: Comprehension) -> Self {
        ast::Comprehension {
            loop_iters: c
                .loop_iters
                .into_iter()
                .map(|(i, r)| (ident(i), r.into()))
                .collect(),
            filter: c.filter.map(ast::RValue::from),
            yields: c.yields.into(),
        }
    }
}

impl From<Subscript> for ast::Subscript {
    fn from(s: Subscript) -> Self {
        match s {
            Subscript::Single(r) => ast::Subscript::Single(r.into()),
            Subscript::Range(a, b) => {
                ast::Subscript::Range(a.map(ast::RValue::from), b.map(ast::RValue::from))
            }
        }
    }
}

impl From<IfThenElse> for ast::IfThenElse {
    fn from(c: IfThenElse) -> Self {
        ast::IfThenElse {
            cond: c.cond.into(),
            then: c.then.into(),
            otherwise: c.otherwise.into(),
        }
    }
}

impl From<Literal> for ast::Literal {
    fn from(l: Literal) -> Self {
        match l {
            Literal::Numeric(s) => ast::Literal::Numeric(s),
            Literal::String(s) => ast::Literal::String(s),
            Literal::Logical(b) => ast::Literal::Logical(b),
            Literal::Array(v) => ast::Literal::Array(into_all(v)),
            Literal::Tuple(v) => ast::Literal::Tuple(into_all(v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// tract's NNEF stdlib uses every construct of the grammar (fragments
    /// with generic declarations, defaults, comprehensions, subscripts,
    /// if-then-else, tuples): each fragment must come back unchanged.
    #[test]
    fn the_whole_nnef_stdlib_survives_the_round_trip() {
        let fragments = tract_nnef::framework::stdlib();
        assert!(fragments.len() > 50, "{} fragments", fragments.len());
        let doc = ast::Document {
            version: "1.0".into(),
            extension: vec![(ast::Identifier("tract_core".into()), "x".into())],
            fragments,
            graph_def: ast::GraphDef {
                id: ast::Identifier("g".into()),
                parameters: vec![],
                results: vec![],
                body: vec![],
            },
        };
        let text = "the text it came from";
        let member = encode(text, &doc).expect("round trip");
        assert_eq!(decode(&member, text).as_ref(), Some(&doc));
        let kinds = format!("{:?}", doc.fragments);
        for construct in ["Comprehension", "Subscript", "IfThenElse", "Tuple", "Range"] {
            assert!(kinds.contains(construct), "the stdlib has no {construct}");
        }
    }

    #[test]
    fn a_document_is_refused_for_any_other_text_or_layout() {
        let doc = tract_nnef::ast::parse::parse_document(
            "version 1.0;\ngraph g(x) -> (y) {\n  x = external<scalar>(shape = [1, 2]);\n  y = add(x, 1.5);\n}\n",
        )
        .unwrap();
        let member = encode("text", &doc).unwrap();
        assert_eq!(decode(&member, "text"), Some(doc));
        assert_eq!(decode(&member, "text "), None, "another text");
        let mut other_magic = member.clone();
        other_magic[MAGIC.len() - 2] = b'2';
        assert_eq!(decode(&other_magic, "text"), None, "another layout");
        assert_eq!(decode(&member[..member.len() - 1], "text"), None, "cut");
        assert_eq!(decode(b"", "text"), None, "empty");
    }
}
