// The arm table: every arm's catalogue prior and its running counts, in memory that several processes share.
//
// Plain C++, no Python and no files: the table lives in a buffer the caller provides (in the service, a
// MAP_SHARED mapping of a file in /dev/shm that every worker maps), ids arrive as IdRef views
// (id_index.hpp), outputs go into caller-owned buffers, nothing throws, and every entry point that can fail
// returns an ArmStatus.
//
// Layout of the buffer (arm_table_bytes gives its size; every part starts on a 64-byte boundary):
//   header   magic, layout version, sizes, the hash key, and the atomic counters;
//   slots    open addressing with linear probing, one 64-bit word each: the high half of the id's hash as
//            a tag and row + 1 in the low half (0 marks an empty slot, so a zeroed buffer is an empty
//            table). There are 3 slots per row, so the load factor never passes 1/3 and a probe always
//            ends: slots cannot fill up before rows do. A lookup that misses walks its run to an empty
//            slot, one unpredictable branch per slot, so short runs pay for their memory (at 2 slots per
//            row, gather of 100,000 arms was ~20% slower; at 3 it is as fast as IdIndex's);
//   rows     one 64-byte ArmRecord per arm, in order of arrival;
//   arena    the bytes of ids longer than kArmInlineId, back to back (shorter ids live in their record).
//
// Concurrency: any number of threads in any number of processes may look up, insert and count at the same
// time, with no lock (so a killed process can leave none held):
//   - lookups read a slot with acquire and then the record it names, whose id and prior never change once
//     published;
//   - an insert reserves a row and its arena bytes with compare-and-swap loops on the counters (so they
//     never overshoot the capacity), writes the record, then publishes it by a compare-and-swap of an empty
//     slot (release). If another process published the same id first, the insert uses that row and marks
//     its own as wasted (counted in rows_wasted). A process killed between reserving and publishing wastes
//     its row silently: the row keeps flags 0 and is never reachable;
//   - impressions are added with an atomic add, rewards with a compare-and-swap on the double's bits.
// Rows are never deleted and the table never grows: a full table refuses inserts (kArmRowsFull,
// kArmArenaFull) and keeps serving lookups.
//
// Preconditions (checked by the caller, not here):
//   - the buffer is 64-byte aligned, writable, and for arm_table_create zeroed over its whole length;
//   - every IdRef points at `size` readable bytes and stays valid for the duration of the call;
//   - priors and catalogue parameters are finite and > 0; impressions and rewards added are >= 0;
//   - row numbers passed in (arm_add_impressions) are -1 or below arm_table_rows;
//   - output buffers have room for n elements and do not alias the inputs.
#pragma once

#include <cstddef>
#include <cstdint>

#include "mab/id_index.hpp"

namespace mab {

enum ArmStatus : int {
    kArmOk = 0,
    kArmNoMemory = 1,    // same value as kIdNoMemory
    kArmDuplicate = 2,   // arm_table_load: the id is already in the table; *dup_row names its row
    kArmTooBig = 3,      // capacity above kArmMaxRows, or a size that overflows
    kArmRowsFull = 4,    // every row is taken
    kArmArenaFull = 5,   // no room left for the id's bytes
    kArmBadLayout = 6,   // arm_table_attach: not a table, another layout version, or sizes that disagree
    kArmCsvEmpty = 7,    // the CSV holds no record at all, not even a header
    kArmCsvBadHeader = 8,  // the header lacks entity_id, alpha or beta
};

constexpr uint64_t kArmMagic = 0x31656C6261546D41ULL;  // "AmTable1" in little-endian bytes
constexpr uint32_t kArmLayoutVersion = 1;
constexpr std::size_t kArmInlineId = 8;       // ids of up to this many bytes live in their record
constexpr std::size_t kArmMaxRows = std::size_t{1} << 30;  // 3 slots per row stay below 2**32 slots

// ArmRecord.flags
constexpr uint32_t kArmCatalogue = 1;  // loaded from the catalogue (load / load_csv)
constexpr uint32_t kArmRuntime = 2;    // first seen at run time, inserted with the prior
constexpr uint32_t kArmWasted = 4;     // lost a publication race: not an arm, never reachable

// One row. 64 bytes, 64-aligned: a lookup reads the prior, the counts and (for short ids) the id's bytes
// in one cache line. Fields other than impressions, rewards and flags never change once published.
struct alignas(64) ArmRecord {
    uint64_t hash;         // hash_id_keyed of the id under the table's key
    double alpha0;         // the prior / catalogue parameters
    double beta0;
    uint64_t impressions;  // atomic
    uint64_t rewards;      // atomic; the bits of a double
    uint64_t id_offset;    // of the id's bytes in the arena (ids longer than kArmInlineId)
    uint32_t id_size;
    uint32_t flags;        // kArmCatalogue | kArmRuntime | kArmWasted; 0 while being written
    char id_inline[kArmInlineId];  // the id's bytes when id_size <= kArmInlineId
};
static_assert(sizeof(ArmRecord) == 64, "one record per cache line");

struct ArmTable;  // the header at the start of the buffer; opaque to callers

// Bytes a table of `capacity` rows and `id_bytes` arena bytes needs; 0 if capacity > kArmMaxRows or the
// size overflows.
std::size_t arm_table_bytes(std::size_t capacity, std::size_t id_bytes) noexcept;

// Writes a new header into `buffer` (`size` bytes, zeroed) and draws the table's hash key. *out points
// into the buffer.
int arm_table_create(void* buffer, std::size_t size, std::size_t capacity, std::size_t id_bytes,
                     ArmTable** out) noexcept;

// Checks the header already in `buffer` against `size`; kArmBadLayout if it is not a table this code can use.
int arm_table_attach(void* buffer, std::size_t size, ArmTable** out) noexcept;

std::size_t arm_table_capacity(const ArmTable* table) noexcept;
std::size_t arm_table_id_bytes(const ArmTable* table) noexcept;
std::size_t arm_table_memory_bytes(const ArmTable* table) noexcept;
// Rows taken (arms plus wasted rows, some perhaps still being written): records [0, rows) are readable.
std::size_t arm_table_rows(const ArmTable* table) noexcept;
uint64_t arm_table_rows_wasted(const ArmTable* table) noexcept;
std::size_t arm_table_arena_used(const ArmTable* table) noexcept;
// The first record; records of rows >= arm_table_rows may be half written.
const ArmRecord* arm_table_records(const ArmTable* table) noexcept;
// The id of a row (a view into the table), or {nullptr, 0} if the row holds no published arm yet.
IdRef arm_id_at(const ArmTable* table, std::size_t row) noexcept;

// Bulk catalogue insert of n ids with their parameters, in order. Stops at the first id already in the
// table (kArmDuplicate, *dup_row its row, *done the position reached) or when full; rows inserted before
// stay. *done is the number of ids inserted.
int arm_table_load(ArmTable* table, const IdRef* ids, const double* alpha0, const double* beta0,
                   std::size_t n, std::size_t* done, int64_t* dup_row) noexcept;

// For i < n: posterior of ids[i] into alpha_out[i], beta_out[i] and its row into rows_out[i], or the prior
// and -1 when the table does not hold it; *n_known counts the ids found. The posterior is
//   alpha = alpha0 + rewards,   beta = beta0 + max(impressions - rewards, 0)
// (the max keeps beta > 0 when a reward is counted before its impression).
int arm_gather_fill(const ArmTable* table, const IdRef* ids, std::size_t n, double prior_alpha,
                    double prior_beta, double* alpha_out, double* beta_out, int32_t* rows_out,
                    std::size_t* n_known) noexcept;

// The row of one id, or -1.
int64_t arm_find(const ArmTable* table, IdRef id) noexcept;

// The row of id, inserting it with (alpha0, beta0) and `flags` if absent. kArmRowsFull / kArmArenaFull
// when it is absent and cannot be inserted (*row is then -1).
int arm_find_or_insert(ArmTable* table, IdRef id, double alpha0, double beta0, uint32_t flags,
                       int64_t* row) noexcept;

// For each p in picks[0..n_picks): row = rows[p], or when that is -1 the row of ids[j] for the j-th such
// pick (inserted with the prior and kArmRuntime if need be); adds one impression to it. `ids` holds one
// view per pick whose row is -1, in order. *n_failed counts picks not recorded because the table was full.
int arm_add_impressions(ArmTable* table, const IdRef* ids, const int32_t* rows, const intptr_t* picks,
                        std::size_t n_picks, double prior_alpha, double prior_beta,
                        std::size_t* n_failed) noexcept;

// Adds impressions and rewards to one row.
void arm_add_counts(ArmTable* table, std::size_t row, uint64_t impressions, double rewards) noexcept;

// For i < n: raises the counts of ids[i] to at least impressions[i] and rewards[i] (each an atomic max; ids not in
// the table are inserted with the prior and kArmRuntime). Absolute counts read from a store whose counts only grow
// can so be applied in any order and more than once. *n_failed counts ids not recorded because the table was full.
int arm_raise_counts(ArmTable* table, const IdRef* ids, const uint64_t* impressions, const double* rewards,
                     std::size_t n, double prior_alpha, double prior_beta, std::size_t* n_failed) noexcept;

// ---------------------------------------------------------------------------------------------------------
// CSV catalogue loading
//
// A catalogue is a CSV file whose header names entity_id, alpha and beta (any order, other columns ignored).
// The caller reads the file in blocks and feeds them in order; the parser takes what it can and says how
// many bytes it consumed (up to the end of the last complete record), and the caller keeps the rest in front
// of the next block. The dialect is Python's csv.reader default: comma-separated, fields may be enclosed in
// double quotes with "" for a quote and line breaks inside; lines end with \n, \r\n or \r. A record that is
// one blank field is skipped. The id and the numbers are stripped of ASCII whitespace. Each bad record is
// reported with the line it ends on (1-based: csv.reader's line_num after reading it).

enum ArmCsvProblem : int {
    kCsvTooFewFields = 1,  // count = fields found, expected = fields in the header
    kCsvEmptyId = 2,
    kCsvDuplicate = 3,     // first_line = line of the first occurrence, 0 if it was in the table before
    kCsvBadAlpha = 4,      // text = the field as written
    kCsvBadBeta = 5,
    kCsvBadUtf8 = 6,       // the id is not valid UTF-8
    kCsvUnterminated = 7,  // a quoted field runs to the end of the file
};

constexpr std::size_t kCsvErrorText = 120;  // bytes of a field kept for a report

struct ArmCsvError {
    int problem;
    uint64_t line;
    uint64_t count;
    uint64_t expected;
    uint64_t first_line;
    std::size_t text_size;  // bytes of the field, which may exceed what `text` keeps
    char text[kCsvErrorText];
};

struct ArmCsvLoad;  // parser state across blocks

// A parser that inserts into `table` (nullptr: only count, for arm_csv_scan) and keeps the first
// `errors_max` problems. *out is nullptr on error.
int arm_csv_begin(ArmTable* table, std::size_t errors_max, ArmCsvLoad** out) noexcept;
void arm_csv_destroy(ArmCsvLoad* load) noexcept;

// Parses data[0..n); *consumed is how far it got. With eof, parses to the end. Returns kArmOk, or
// kArmCsvEmpty / kArmCsvBadHeader (at eof, or on the first record), or kArmRowsFull / kArmArenaFull.
int arm_csv_feed(ArmCsvLoad* load, const char* data, std::size_t n, bool eof, std::size_t* consumed) noexcept;

struct ArmCsvCounts {
    uint64_t rows;         // loaded (or, for a scan, records after the header)
    uint64_t id_bytes;     // scan: bytes of the id fields as written, counting only those over kArmInlineId
    uint64_t problems;     // bad rows found (each bad row may have several problems)
    uint64_t reported;     // problems kept, <= errors_max
    uint64_t line;         // lines parsed so far
    uint64_t failed_line;  // the row that found the table full (kArmRowsFull / kArmArenaFull), else 0
};
void arm_csv_counts(const ArmCsvLoad* load, ArmCsvCounts* counts) noexcept;
const ArmCsvError* arm_csv_errors(const ArmCsvLoad* load) noexcept;

}  // namespace mab
