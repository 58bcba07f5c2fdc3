//! GGUF v2/v3 reader over a memory map.
//!
//! The file is untrusted: every length is bounded, every offset is overflow-checked and every
//! tensor extent is checked against the file size before anything is sliced.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::kernels::cpu::QuantType;

const GGUF_MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Crafted files can claim absurd counts; these caps keep parsing bounded in memory and time.
const MAX_STRING_BYTES: u64 = 64 << 20;
const MAX_ARRAY_ELEMENTS: u64 = 16 << 20;
const MAX_TENSOR_COUNT: u64 = 1 << 20;
const MAX_METADATA_COUNT: u64 = 1 << 20;
const MAX_TENSOR_DIMS: u32 = 4;
const MAX_ARRAY_NESTING: u32 = 2;
/// A split model (llama.cpp's `llama-gguf-split`) is one GGUF file per part; every part says
/// where it belongs with these keys, and the first holds the model's metadata.
const SPLIT_NO_KEY: &str = "split.no";
const SPLIT_COUNT_KEY: &str = "split.count";
const SPLIT_TENSORS_COUNT_KEY: &str = "split.tensors.count";
/// Bounds the files a crafted `split.count` makes us open and map (real models: tens of parts).
pub const MAX_SPLIT_COUNT: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: cannot open: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file (magic {magic:?}, expected \"GGUF\")")]
    BadMagic { path: PathBuf, magic: [u8; 4] },
    #[error("{path}: unsupported GGUF version {version} (supported: 2 and 3)")]
    BadVersion { path: PathBuf, version: u32 },
    #[error(
        "{path}: truncated: {what} at byte {offset} needs {needed} bytes, file has {file_size}"
    )]
    Truncated {
        path: PathBuf,
        what: String,
        offset: u64,
        needed: u64,
        file_size: u64,
    },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("{path}: tensor '{name}' has unsupported type id {type_id}")]
    UnknownType {
        path: PathBuf,
        name: String,
        type_id: u32,
    },
    #[error("{path}: missing metadata key '{key}'")]
    MissingKey { path: PathBuf, key: String },
    #[error("{path} is part {number} of {count} of a split model: pass the first part{hint}")]
    NotFirstPart {
        path: PathBuf,
        number: usize,
        count: usize,
        /// ", NAME-00001-of-NNNNN.gguf" when the name says what the first part is called.
        hint: String,
    },
    #[error("{path}: cannot open part {number} of {count} of the split model {first}: {source}")]
    MissingPart {
        path: PathBuf,
        number: usize,
        count: usize,
        first: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not part {number} of {count} of the split model {first}: {what}")]
    ForeignPart {
        path: PathBuf,
        number: usize,
        count: usize,
        first: PathBuf,
        what: String,
    },
    #[error("{path}: metadata key '{key}' has type {found}, expected {expected}")]
    WrongType {
        path: PathBuf,
        key: String,
        found: &'static str,
        expected: &'static str,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::F32(_) => "f32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F64(_) => "f64",
        }
    }

    /// Any integer type that fits, as llama.cpp accepts for counts and ids.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
}

#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the row length (input dimension of a matrix).
    pub dims: Vec<u64>,
    pub quant_type: QuantType,
    /// Which of the model's files holds it: 0 for a single file, else its part (0-based) of a
    /// split model.
    pub part: usize,
    /// Absolute byte offset in that file.
    pub offset: u64,
    pub size_bytes: u64,
}

impl TensorInfo {
    pub fn element_count(&self) -> u64 {
        self.dims.iter().product()
    }
    pub fn row_length(&self) -> usize {
        self.dims[0] as usize
    }
    pub fn row_count(&self) -> usize {
        (self.element_count() / self.dims[0].max(1)) as usize
    }
}

/// A model: one GGUF file, or the parts of a split model taken as one (metadata from the first
/// part, tensors from all). Code that reads tensors goes through `tensor_bytes`, so it does not
/// care which.
pub struct GgufFile {
    /// The file named on the command line: the only file, or the first part.
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    /// Every part's tensors, in part order.
    pub tensors: Vec<TensorInfo>,
    tensor_index: BTreeMap<String, usize>,
    /// The model's files in order: one, or every part of a split model.
    pub parts: Vec<GgufPart>,
}

/// One file of a model, mapped.
pub struct GgufPart {
    pub path: PathBuf,
    /// Bytes of header, metadata and tensor index: what identifies the file cheaply.
    pub header_bytes: u64,
    pub file_size: u64,
    mmap: Mmap,
}

impl GgufPart {
    /// Header, metadata and tensor index: hashed to check two paths hold the same model.
    pub fn header(&self) -> &[u8] {
        &self.mmap[..self.header_bytes as usize]
    }
}

/// One file parsed on its own, before the parts of a split model are joined.
struct ParsedPart {
    version: u32,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    part: GgufPart,
}

/// Where a file sits in a split model, from its split keys.
struct SplitKeys {
    /// 0-based, as stored.
    number: usize,
    count: usize,
    tensor_count: Option<u64>,
}

/// The end of a part's name: `-00002-of-00004.gguf` for part 1 (0-based) of 4, the pattern of
/// llama.cpp's `llama_split_path`.
fn part_suffix(number: usize, count: usize) -> String {
    format!("-{:05}-of-{:05}.gguf", number + 1, count)
}

/// The path of part `target` of the set `path` is part `number` of, if `path` is named as
/// llama-gguf-split names parts (a non-empty prefix, then the suffix).
fn sibling_path(path: &Path, number: usize, count: usize, target: usize) -> Option<PathBuf> {
    let name = path.file_name()?.to_str()?;
    let prefix = name
        .strip_suffix(&part_suffix(number, count))
        .filter(|p| !p.is_empty())?;
    Some(path.with_file_name(format!("{prefix}{}", part_suffix(target, count))))
}

/// The split keys of a file's metadata; None for a file that is not a part (no `split.count`,
/// or 0 or 1: a merged model keeps `split.count` 0, and llama.cpp loads 1 as a single file).
fn split_keys(
    path: &Path,
    metadata: &BTreeMap<String, Value>,
) -> Result<Option<SplitKeys>, GgufError> {
    let integer = |key: &str| -> Result<Option<u64>, GgufError> {
        match metadata.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| GgufError::WrongType {
                path: path.to_path_buf(),
                key: key.into(),
                found: v.type_name(),
                expected: "integer",
            }),
        }
    };
    let count = match integer(SPLIT_COUNT_KEY)? {
        None | Some(0 | 1) => return Ok(None),
        Some(c) if c > MAX_SPLIT_COUNT as u64 => {
            return Err(GgufError::Invalid {
                path: path.to_path_buf(),
                what: format!("{SPLIT_COUNT_KEY} {c} exceeds the limit of {MAX_SPLIT_COUNT} parts"),
            });
        }
        Some(c) => c as usize,
    };
    let number = integer(SPLIT_NO_KEY)?.ok_or_else(|| GgufError::MissingKey {
        path: path.to_path_buf(),
        key: SPLIT_NO_KEY.into(),
    })?;
    if number >= count as u64 {
        return Err(GgufError::Invalid {
            path: path.to_path_buf(),
            what: format!("{SPLIT_NO_KEY} {number} is not below {SPLIT_COUNT_KEY} {count}"),
        });
    }
    Ok(Some(SplitKeys {
        number: number as usize,
        count,
        tensor_count: integer(SPLIT_TENSORS_COUNT_KEY)?,
    }))
}

fn map_file(path: &Path) -> std::io::Result<Mmap> {
    let file = File::open(path)?;
    // SAFETY: the map is read-only; a file truncated underneath us is outside what tp defends against,
    // as with every mmap-based model loader.
    unsafe { Mmap::map(&file) }
}

struct Reader<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    position: u64,
}

impl<'a> Reader<'a> {
    fn take(&mut self, needed: u64, what: &str) -> Result<&'a [u8], GgufError> {
        let file_size = self.bytes.len() as u64;
        let end = self
            .position
            .checked_add(needed)
            .filter(|&end| end <= file_size);
        let Some(end) = end else {
            return Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: what.to_string(),
                offset: self.position,
                needed,
                file_size,
            });
        };
        let slice = &self.bytes[self.position as usize..end as usize];
        self.position = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        Ok(self
            .take(N as u64, what)?
            .try_into()
            .expect("take returns N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn invalid(&self, what: String) -> GgufError {
        GgufError::Invalid {
            path: self.path.to_path_buf(),
            what,
        }
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let length = self.u64(what)?;
        if length > MAX_STRING_BYTES {
            return Err(self.invalid(format!(
                "{what}: string length {length} exceeds the limit of {MAX_STRING_BYTES} bytes"
            )));
        }
        let bytes = self.take(length, what)?;
        // Vocabularies of real models hold invalid UTF-8 rarely; keep them readable rather than fail.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn value(&mut self, type_id: u32, key: &str, depth: u32) -> Result<Value, GgufError> {
        Ok(match type_id {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(self.array::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                other => return Err(self.invalid(format!("{key}: invalid bool byte {other}"))),
            },
            8 => Value::String(self.string(key)?),
            9 => {
                if depth >= MAX_ARRAY_NESTING {
                    return Err(self.invalid(format!("{key}: arrays nested too deeply")));
                }
                let element_type = self.u32(key)?;
                let count = self.u64(key)?;
                if count > MAX_ARRAY_ELEMENTS {
                    return Err(self.invalid(format!(
                        "{key}: array of {count} elements exceeds the limit of {MAX_ARRAY_ELEMENTS}"
                    )));
                }
                // Every element takes at least one byte: a count past the end is truncation.
                let remaining = self.bytes.len() as u64 - self.position;
                if count > remaining {
                    return Err(GgufError::Truncated {
                        path: self.path.to_path_buf(),
                        what: format!("{key}: array of {count} elements"),
                        offset: self.position,
                        needed: count,
                        file_size: self.bytes.len() as u64,
                    });
                }
                let mut values = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    values.push(self.value(element_type, key, depth + 1)?);
                }
                Value::Array(values)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            other => {
                return Err(self.invalid(format!("{key}: unknown metadata value type {other}")));
            }
        })
    }
}

impl GgufFile {
    /// Opens a model file. The first part of a split model (a `split.count` of 2 or more)
    /// brings in its siblings, found by name (`NAME-00002-of-00004.gguf` ...), each checked to
    /// be that part of this set.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref().to_path_buf();
        let mmap = map_file(&path).map_err(|source| GgufError::Io {
            path: path.clone(),
            source,
        })?;
        let first = Self::parse(path.clone(), mmap, 0)?;
        let Some(split) = split_keys(&path, &first.metadata)? else {
            return Ok(Self::join(vec![first]));
        };
        if split.number != 0 {
            let hint = sibling_path(&path, split.number, split.count, 0)
                .map_or(String::new(), |p| format!(", {}", p.display()));
            return Err(GgufError::NotFirstPart {
                path,
                number: split.number + 1,
                count: split.count,
                hint,
            });
        }
        let Some(tensor_count) = split.tensor_count else {
            return Err(GgufError::MissingKey {
                path,
                key: SPLIT_TENSORS_COUNT_KEY.into(),
            });
        };
        let mut parts = vec![first];
        for number in 1..split.count {
            let Some(part_path) = sibling_path(&path, 0, split.count, number) else {
                return Err(GgufError::Invalid {
                    what: format!(
                        "the first of {} parts of a split model must be named NAME{} (as \
                         llama-gguf-split names them) so that the others can be found",
                        split.count,
                        part_suffix(0, split.count)
                    ),
                    path,
                });
            };
            let foreign = |what: String| GgufError::ForeignPart {
                path: part_path.clone(),
                number: number + 1,
                count: split.count,
                first: path.clone(),
                what,
            };
            let mmap = map_file(&part_path).map_err(|source| GgufError::MissingPart {
                path: part_path.clone(),
                number: number + 1,
                count: split.count,
                first: path.clone(),
                source,
            })?;
            let part = Self::parse(part_path.clone(), mmap, number)?;
            match split_keys(&part_path, &part.metadata)? {
                None => return Err(foreign("it has no split keys".into())),
                Some(keys) if keys.count != split.count || keys.number != number => {
                    return Err(foreign(format!(
                        "it says it is part {} of {}",
                        keys.number + 1,
                        keys.count
                    )));
                }
                Some(SplitKeys {
                    tensor_count: Some(n),
                    ..
                }) if n != tensor_count => {
                    return Err(foreign(format!(
                        "its set has {n} tensors, the first part's has {tensor_count}"
                    )));
                }
                Some(_) => {}
            }
            parts.push(part);
        }
        let found: usize = parts.iter().map(|p| p.tensors.len()).sum();
        if found as u64 > MAX_TENSOR_COUNT {
            return Err(GgufError::Invalid {
                path,
                what: format!("{found} tensors exceed the limit of {MAX_TENSOR_COUNT}"),
            });
        }
        // A tensor name in two parts, or a count off, means a part of another split.
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for (number, part) in parts.iter().enumerate() {
            for t in &part.tensors {
                if let Some(earlier) = seen.insert(&t.name, number) {
                    return Err(GgufError::ForeignPart {
                        path: part.part.path.clone(),
                        number: number + 1,
                        count: split.count,
                        first: path,
                        what: format!("tensor '{}' is in part {} too", t.name, earlier + 1),
                    });
                }
            }
        }
        if found as u64 != tensor_count {
            return Err(GgufError::Invalid {
                path,
                what: format!(
                    "{SPLIT_TENSORS_COUNT_KEY} is {tensor_count} but the {} parts hold {found} \
                     tensors (is a part from another split?)",
                    split.count
                ),
            });
        }
        Ok(Self::join(parts))
    }

    /// One model from its parsed files: metadata and version of the first, every tensor.
    fn join(parts: Vec<ParsedPart>) -> GgufFile {
        let mut parts = parts.into_iter();
        let first = parts.next().expect("a model has a file");
        let (path, version, metadata) = (first.part.path.clone(), first.version, first.metadata);
        let mut tensors = first.tensors;
        let mut files = vec![first.part];
        for part in parts {
            tensors.extend(part.tensors);
            files.push(part.part);
        }
        let tensor_index = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        GgufFile {
            path,
            version,
            metadata,
            tensors,
            tensor_index,
            parts: files,
        }
    }

    /// Parses a GGUF image held in memory (copied into an anonymous map); `name` stands for
    /// its path in errors. Taken as a file on its own: split keys are not followed.
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: &[u8]) -> Result<GgufFile, GgufError> {
        let path = name.into();
        let io_error = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        let mut map = memmap2::MmapMut::map_anon(bytes.len().max(1)).map_err(io_error)?;
        map[..bytes.len()].copy_from_slice(bytes);
        let map = map.make_read_only().map_err(io_error)?;
        if bytes.is_empty() {
            return Err(GgufError::Truncated {
                path,
                what: "magic".into(),
                offset: 0,
                needed: 4,
                file_size: 0,
            });
        }
        Ok(Self::join(vec![Self::parse(path, map, 0)?]))
    }

    /// Parses one file, whose tensors are given part number `part`.
    fn parse(path: PathBuf, mmap: Mmap, part: usize) -> Result<ParsedPart, GgufError> {
        let file_size = mmap.len() as u64;
        let mut reader = Reader {
            path: &path,
            bytes: &mmap,
            position: 0,
        };
        let magic: [u8; 4] = reader.array("magic")?;
        if &magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic {
                path: path.clone(),
                magic,
            });
        }
        let version = reader.u32("version")?;
        if version != 2 && version != 3 {
            return Err(GgufError::BadVersion {
                path: path.clone(),
                version,
            });
        }
        let tensor_count = reader.u64("tensor count")?;
        let metadata_count = reader.u64("metadata count")?;
        if tensor_count > MAX_TENSOR_COUNT {
            return Err(reader.invalid(format!(
                "tensor count {tensor_count} exceeds the limit of {MAX_TENSOR_COUNT}"
            )));
        }
        if metadata_count > MAX_METADATA_COUNT {
            return Err(reader.invalid(format!(
                "metadata count {metadata_count} exceeds the limit of {MAX_METADATA_COUNT}"
            )));
        }

        let mut metadata = BTreeMap::new();
        for _ in 0..metadata_count {
            let key = reader.string("metadata key")?;
            let type_id = reader.u32(&key)?;
            let value = reader.value(type_id, &key, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(reader.invalid(format!("duplicate metadata key '{key}'")));
            }
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(value) => match value.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                _ => {
                    return Err(reader.invalid(format!(
                        "general.alignment {value:?} is not a power of two up to 1 MiB"
                    )));
                }
            },
        };

        struct RawTensor {
            name: String,
            dims: Vec<u64>,
            quant_type: QuantType,
            relative_offset: u64,
            size_bytes: u64,
        }
        let mut raw = Vec::with_capacity(tensor_count as usize);
        let mut names = std::collections::BTreeSet::new();
        for _ in 0..tensor_count {
            let name = reader.string("tensor name")?;
            let dim_count = reader.u32(&name)?;
            if dim_count == 0 || dim_count > MAX_TENSOR_DIMS {
                return Err(reader.invalid(format!(
                    "tensor '{name}' has {dim_count} dimensions (1 to {MAX_TENSOR_DIMS} allowed)"
                )));
            }
            let mut dims = Vec::with_capacity(dim_count as usize);
            for _ in 0..dim_count {
                dims.push(reader.u64(&name)?);
            }
            let type_id = reader.u32(&name)?;
            let relative_offset = reader.u64(&name)?;
            let Some(quant_type) = QuantType::from_ggml_id(type_id) else {
                return Err(GgufError::UnknownType {
                    path: path.clone(),
                    name,
                    type_id,
                });
            };
            let elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&e| e > 0 && e < 1 << 40);
            let Some(elements) = elements else {
                return Err(
                    reader.invalid(format!("tensor '{name}' has absurd dimensions {dims:?}"))
                );
            };
            let row_bytes = usize::try_from(dims[0])
                .ok()
                .and_then(|n| quant_type.row_bytes(n));
            let Some(row_bytes) = row_bytes else {
                return Err(reader.invalid(format!(
                    "tensor '{name}': row length {} is not a multiple of the {} block of {} elements",
                    dims[0],
                    quant_type.name(),
                    quant_type.block_elements()
                )));
            };
            let size_bytes = (row_bytes as u64)
                .checked_mul(elements / dims[0])
                .ok_or_else(|| reader.invalid(format!("tensor '{name}' size overflows")))?;
            if !names.insert(name.clone()) {
                return Err(reader.invalid(format!("duplicate tensor name '{name}'")));
            }
            raw.push(RawTensor {
                name,
                dims,
                quant_type,
                relative_offset,
                size_bytes,
            });
        }

        let header_bytes = reader.position;
        let data_start = header_bytes.div_ceil(alignment).checked_mul(alignment);
        let Some(data_start) = data_start else {
            return Err(reader.invalid("data section offset overflows".into()));
        };
        let mut tensors = Vec::with_capacity(raw.len());
        for t in raw {
            if t.relative_offset % alignment != 0 {
                return Err(reader.invalid(format!(
                    "tensor '{}' offset {} is not aligned to {alignment}",
                    t.name, t.relative_offset
                )));
            }
            let offset = data_start.checked_add(t.relative_offset);
            let end = offset.and_then(|o| o.checked_add(t.size_bytes));
            match (offset, end) {
                (Some(offset), Some(end)) if end <= file_size => tensors.push(TensorInfo {
                    name: t.name,
                    dims: t.dims,
                    quant_type: t.quant_type,
                    part,
                    offset,
                    size_bytes: t.size_bytes,
                }),
                _ => {
                    return Err(GgufError::Truncated {
                        path: path.clone(),
                        what: format!("data of tensor '{}'", t.name),
                        offset: offset.unwrap_or(u64::MAX),
                        needed: t.size_bytes,
                        file_size,
                    });
                }
            }
        }

        Ok(ParsedPart {
            version,
            metadata,
            tensors,
            part: GgufPart {
                path,
                header_bytes,
                file_size,
                mmap,
            },
        })
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of a tensor, from the file that holds it; extents were checked at parse time.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.parts[info.part].mmap[info.offset as usize..(info.offset + info.size_bytes) as usize]
    }

    /// The size of each of the model's files, in order: with the header hash, its identity.
    pub fn part_sizes(&self) -> Vec<u64> {
        self.parts.iter().map(|p| p.file_size).collect()
    }

    /// Drops the mapped pages of a tensor whose bytes were copied out, so that loading a shard
    /// does not keep the whole file resident (and the worker's peak RSS stays near its shard).
    pub fn release(&self, info: &TensorInfo) {
        let page = 4096u64;
        let start = info.offset.div_ceil(page) * page;
        let end = (info.offset + info.size_bytes) / page * page;
        if end > start {
            // SAFETY: the map is private and read-only; dropped pages of a file mapping are
            // re-read from the file if touched again, so no data is lost.
            let _ = unsafe {
                self.parts[info.part].mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start as usize,
                    (end - start) as usize,
                )
            };
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn require(&self, key: &str) -> Result<&Value, GgufError> {
        self.get(key).ok_or_else(|| GgufError::MissingKey {
            path: self.path.clone(),
            key: key.into(),
        })
    }

    fn wrong_type(&self, key: &str, found: &Value, expected: &'static str) -> GgufError {
        GgufError::WrongType {
            path: self.path.clone(),
            key: key.into(),
            found: found.type_name(),
            expected,
        }
    }

    pub fn get_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, v, "integer")),
        }
    }

    pub fn require_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.require(key)?;
        v.as_u64().ok_or_else(|| self.wrong_type(key, v, "integer"))
    }

    pub fn get_f64(&self, key: &str) -> Result<Option<f64>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, v, "number")),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong_type(key, v, "bool")),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.wrong_type(key, v, "string")),
        }
    }

    pub fn require_str(&self, key: &str) -> Result<&str, GgufError> {
        self.get_str(key)?.ok_or_else(|| GgufError::MissingKey {
            path: self.path.clone(),
            key: key.into(),
        })
    }

    pub fn require_array(&self, key: &str) -> Result<&[Value], GgufError> {
        match self.require(key)? {
            Value::Array(items) => Ok(items),
            v => Err(self.wrong_type(key, v, "array")),
        }
    }

    pub fn string_array(&self, key: &str) -> Result<Vec<String>, GgufError> {
        self.require_array(key)?
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(self.wrong_type(key, other, "array of strings")),
            })
            .collect()
    }

    pub fn invalid(&self, what: impl Into<String>) -> GgufError {
        GgufError::Invalid {
            path: self.path.clone(),
            what: what.into(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes a small GGUF file for tests: metadata of a few kinds and F32 tensors.
    pub fn write_test_gguf(path: &Path, tensors: &[(&str, Vec<u64>, Vec<f32>)]) {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&2u64.to_le_bytes());
        let put_str = |out: &mut Vec<u8>, s: &str| {
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        };
        put_str(&mut out, "general.architecture");
        out.extend_from_slice(&8u32.to_le_bytes());
        put_str(&mut out, "llama");
        put_str(&mut out, "test.array");
        out.extend_from_slice(&9u32.to_le_bytes());
        out.extend_from_slice(&5u32.to_le_bytes());
        out.extend_from_slice(&3u64.to_le_bytes());
        for v in [1i32, -2, 3] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        let mut offset = 0u64;
        for (name, dims, data) in tensors {
            put_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset += (data.len() as u64 * 4).div_ceil(32) * 32;
        }
        while out.len() % 32 != 0 {
            out.push(0);
        }
        for (_, _, data) in tensors {
            let start = out.len();
            for v in data {
                out.extend_from_slice(&v.to_le_bytes());
            }
            while (out.len() - start) % 32 != 0 {
                out.push(0);
            }
        }
        std::fs::write(path, out).unwrap();
    }

    #[test]
    fn the_parts_of_a_split_model_are_found_by_name() {
        let first = Path::new("/m/big-00001-of-00004.gguf");
        assert_eq!(
            sibling_path(first, 0, 4, 3),
            Some(PathBuf::from("/m/big-00004-of-00004.gguf"))
        );
        assert_eq!(sibling_path(first, 1, 4, 0), None, "it is part 1, not 2");
        assert_eq!(sibling_path(first, 0, 3, 1), None, "it is one of 4, not 3");
        let no_prefix = Path::new("/m/-00001-of-00004.gguf");
        assert_eq!(sibling_path(no_prefix, 0, 4, 1), None);
        assert_eq!(sibling_path(Path::new("/m/big.gguf"), 0, 4, 1), None);
    }

    #[test]
    fn reads_metadata_and_tensors() {
        let dir = std::env::temp_dir().join(format!("tp-gguf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ok.gguf");
        write_test_gguf(
            &path,
            &[("a", vec![4, 2], (0..8).map(|i| i as f32).collect())],
        );
        let file = GgufFile::open(&path).unwrap();
        assert_eq!(file.require_str("general.architecture").unwrap(), "llama");
        assert_eq!(
            file.get("test.array"),
            Some(&Value::Array(vec![
                Value::I32(1),
                Value::I32(-2),
                Value::I32(3)
            ]))
        );
        let t = file.tensor("a").unwrap();
        assert_eq!((t.row_length(), t.row_count()), (4, 2));
        let bytes = file.tensor_bytes(t);
        assert_eq!(f32::from_le_bytes(bytes[28..32].try_into().unwrap()), 7.0);

        // Every truncation of a valid file is an error, never a panic.
        let full = std::fs::read(&path).unwrap();
        let cut = dir.join("cut.gguf");
        for length in 0..full.len() {
            std::fs::write(&cut, &full[..length]).unwrap();
            assert!(
                GgufFile::open(&cut).is_err(),
                "truncated at {length} parsed"
            );
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
