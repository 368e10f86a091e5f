// The arm table: every arm's catalogue prior and its running counts, in memory that several processes share.
//
// Plain C++, no Python and no files: the table lives in a buffer the caller provides (in the service, a
// MAP_SHARED mapping of a file in /dev/shm that every worker maps), ids arrive as IdRef views
// (id_index.hpp), outputs go into caller-owned buffers, nothing throws, and every entry point that can fail
// returns an ArmStatus.
//
// Layout of the buffer (arm_table_bytes gives its size; every part starts on a 64-byte boundary):
//   header   magic, layout version, sizes, the hash key, and the atomic counters;
//   slots    two sets, the arms' then the segment keys', each sized for its own rows; in each, open addressing
//            with linear probing, one 64-bit word each: the high half of the id's hash as
//            a tag and row + 1 in the low half (0 marks an empty slot, so a zeroed buffer is an empty
//            table). There are 3 slots per row, so the load factor never passes 1/3 and a probe always
//            ends: slots cannot fill up before rows do. A lookup that misses walks its run to an empty
//            slot, one unpredictable branch per slot, so short runs pay for their memory (at 2 slots per
//            row, gather of 100,000 arms was ~20% slower; at 3 it is as fast as IdIndex's);
//   rows     one 64-byte ArmRecord per row, in order of arrival;
//   arena    the bytes of ids longer than kArmInlineId, back to back (shorter ids live in their record): the
//            arms' part first, then the segment rows' part.
//
// Segment rows (kArmSegment) sit beside the arms under keys no arm id can be (ids hold no control character,
// mab_service/ids.py): "\0" + segment for a segment's own row and "\0" + segment + "\0" + arm for the arm within
// it (segment_keys_fill writes them). They have a budget of their own, `segment_rows` rows, their own slots and
// `segment_id_bytes` arena bytes, fixed at creation: segments can fill only that, never take the room of an arm,
// and never lengthen an arm's probe. A key's kind is its first byte (inserts set kArmSegment from it).
//
// Counts are doubles. With a half-life H > 0 they are forward-decayed (Cormode et al., ICDE 2009): an addition at
// time t adds amount * 2**((t - L) / H) for a landmark L, and a read at `now` multiplies by 2**((L - now) / H). The
// landmark moves on by kArmEpochHalfLives half-lives every epoch (arm_table_rebase) so that weights stay far from
// overflow; each count carries its epoch's parity in its sign bit (counts are >= 0, so the bit is free) and is
// rescaled by the rebase's sweep. With H = 0 every weight is 1 and the counts are plain sums, exact integers for
// impressions.
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
//   - counts are added with a compare-and-swap on the double's bits; the rebase's sweep rescales a count with a
//     compare-and-swap too, so an addition and a rescale never lose one another. A count is read first and the
//     epoch after it: a count converted to epoch E+1 was converted after the epoch moved to E+1, so the reader
//     sees E+1 and reads the parity right. Before the epoch moves, every count is swept to the current epoch, so
//     a count is always in the current epoch or the one before, which its parity tells apart.
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
constexpr uint32_t kArmLayoutVersion = 2;
constexpr std::size_t kArmInlineId = 8;       // ids of up to this many bytes live in their record
constexpr std::size_t kArmMaxRows = std::size_t{1} << 30;  // 3 slots per row stay below 2**32 slots
// Half-lives per epoch of the decay's landmark. The epoch moves once `now` is half an epoch past its landmark, so a
// weight, relative to the landmark of its count's epoch or the one before, stays below 2**(1.5 * 256) = 2**384 even
// if that comes half an epoch late: far from the 2**1024 where doubles overflow, with room for 2**600 additions.
constexpr double kArmEpochHalfLives = 256.0;

// ArmRecord.flags
constexpr uint32_t kArmCatalogue = 1;  // loaded from the catalogue (load / load_csv)
constexpr uint32_t kArmRuntime = 2;    // first seen at run time, inserted with the prior
constexpr uint32_t kArmWasted = 4;     // lost a publication race: not an arm, never reachable
constexpr uint32_t kArmSegment = 8;    // a segment row (its key starts with a NUL byte): counted in the segment budget

// One row. 64 bytes, 64-aligned: a lookup reads the prior, the counts and (for short ids) the id's bytes
// in one cache line. Fields other than impressions, rewards and flags never change once published.
struct alignas(64) ArmRecord {
    uint64_t hash;         // hash_id_keyed of the id under the table's key
    double alpha0;         // the prior / catalogue parameters
    double beta0;
    uint64_t impressions;  // atomic; the bits of a double, the epoch's parity in the sign bit
    uint64_t rewards;      // atomic; likewise
    uint64_t id_offset;    // of the id's bytes in the arena (ids longer than kArmInlineId)
    uint32_t id_size;
    uint32_t flags;        // kArmCatalogue | kArmRuntime | kArmWasted; 0 while being written
    char id_inline[kArmInlineId];  // the id's bytes when id_size <= kArmInlineId
};
static_assert(sizeof(ArmRecord) == 64, "one record per cache line");

struct ArmTable;  // the header at the start of the buffer; opaque to callers

// Bytes a table of `capacity` rows (`segment_rows` of them for segment keys) and `id_bytes` arena bytes needs; 0 if
// capacity > kArmMaxRows, segment_rows > capacity or the size overflows.
std::size_t arm_table_bytes(std::size_t capacity, std::size_t id_bytes, std::size_t segment_rows) noexcept;

// Writes a new header into `buffer` (`size` bytes, zeroed) and draws the table's hash key. *out points
// into the buffer. Of `capacity` rows and `id_bytes` arena bytes, `segment_rows` and `segment_id_bytes` are the
// segment rows' (<= the totals). half_life_s >= 0 (0: no decay); landmark: the first epoch's landmark (unix time).
int arm_table_create(void* buffer, std::size_t size, std::size_t capacity, std::size_t id_bytes,
                     std::size_t segment_rows, std::size_t segment_id_bytes, double half_life_s, double landmark,
                     ArmTable** out) noexcept;

// Checks the header already in `buffer` against `size`; kArmBadLayout if it is not a table this code can use.
int arm_table_attach(void* buffer, std::size_t size, ArmTable** out) noexcept;

std::size_t arm_table_capacity(const ArmTable* table) noexcept;
std::size_t arm_table_id_bytes(const ArmTable* table) noexcept;
std::size_t arm_table_memory_bytes(const ArmTable* table) noexcept;
// Rows taken (arms plus wasted rows, some perhaps still being written): records [0, rows) are readable.
std::size_t arm_table_rows(const ArmTable* table) noexcept;
uint64_t arm_table_rows_wasted(const ArmTable* table) noexcept;
std::size_t arm_table_segment_rows(const ArmTable* table) noexcept;       // the segment rows' budget
std::size_t arm_table_segment_rows_used(const ArmTable* table) noexcept;  // taken of it (wasted rows included)
double arm_table_half_life(const ArmTable* table) noexcept;
// The landmark of the current epoch (unix time).
double arm_table_landmark(const ArmTable* table) noexcept;
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
// (the max keeps beta > 0 when a reward is counted before its impression), counts as read at `now`.
int arm_gather_fill(const ArmTable* table, const IdRef* ids, std::size_t n, double prior_alpha,
                    double prior_beta, double now, double* alpha_out, double* beta_out, int32_t* rows_out,
                    std::size_t* n_known) noexcept;

// Bytes segment_key_fill writes for these ids: n * (2 + segment.size) plus the ids' bytes.
std::size_t segment_keys_bytes(IdRef segment, const IdRef* ids, std::size_t n) noexcept;
// Writes the key "\0" + segment + "\0" + ids[i] of each id into `buffer` (segment_keys_bytes long) and its view
// into keys[i].
void segment_keys_fill(IdRef segment, const IdRef* ids, std::size_t n, char* buffer, IdRef* keys) noexcept;

// arm_gather_fill for a segment, in one batched lookup of the 2n rows: keys[i] is the segment key of ids[i]
// (segment_keys_fill). With mu the mean of the arm's global posterior and n_sa, r_sa the counts of keys[i]
// (0 if the table lacks it), the posterior is the global mean as `weight` pseudo-impressions plus the segment's own
//   alpha = weight * mu + r_sa,   beta = weight * (1 - mu) + max(n_sa - r_sa, 0)
// rows_out gets the arms' rows, pair_rows_out the keys' rows (-1 where absent); *n_known counts the arms found.
// weight is finite and > 0. pair_counts is scratch of 2n doubles.
int arm_gather_segment_fill(const ArmTable* table, const IdRef* ids, const IdRef* keys, std::size_t n,
                            double weight, double prior_alpha, double prior_beta, double now, double* alpha_out,
                            double* beta_out, int32_t* rows_out, int32_t* pair_rows_out, double* pair_counts,
                            std::size_t* n_known) noexcept;

// The row of one id, or -1.
int64_t arm_find(const ArmTable* table, IdRef id) noexcept;

// The row of id, inserting it with (alpha0, beta0) and `flags` if absent (a segment key in the segments' budget,
// with kArmSegment). kArmRowsFull / kArmArenaFull when it is absent and cannot be inserted (*row is then -1).
int arm_find_or_insert(ArmTable* table, IdRef id, double alpha0, double beta0, uint32_t flags,
                       int64_t* row) noexcept;

// For each p in picks[0..n_picks): row = rows[p], or when that is -1 the row of ids[j] for the j-th such
// pick (inserted with the prior and `flags`, kArmRuntime, if need be: a segment key, in the segments' budget,
// with kArmSegment added); adds one impression made at `now` to it. `ids` holds one view per pick whose row is -1,
// in order. *n_failed counts picks not recorded because the table (or the segments' budget) was full.
int arm_add_impressions(ArmTable* table, const IdRef* ids, const int32_t* rows, const intptr_t* picks,
                        std::size_t n_picks, double prior_alpha, double prior_beta, uint32_t flags, double now,
                        std::size_t* n_failed) noexcept;

// Adds impressions and rewards made at `when` to one row (each weighs 2**((when - now) / H) at a read at `now`).
void arm_add_counts(ArmTable* table, std::size_t row, double impressions, double rewards, double when) noexcept;

// The counts of one row as read at `now`.
void arm_read_counts(const ArmTable* table, std::size_t row, double now, double* impressions,
                     double* rewards) noexcept;

// The counts of rows [0, n) as read at `now` (n <= arm_table_rows).
void arm_counts_fill(const ArmTable* table, std::size_t n, double now, double* impressions,
                     double* rewards) noexcept;

// Moves the decay's landmark on by one epoch if `now` is past the middle of the current one, sweeping every count
// into the current epoch before and after the move (see the header comment). Any process may call it at any time;
// the node's owner does, every few seconds. Returns 1 if the epoch moved, else 0 (always 0 without decay).
int arm_table_rebase(ArmTable* table, double now) noexcept;

// For i < n: raises the counts of ids[i] to at least impressions[i] and rewards[i] (each an atomic max; ids not in
// the table are inserted with the prior and kArmRuntime). Absolute counts read from a store whose counts only grow
// can so be applied in any order and more than once. *n_failed counts ids not recorded because the table was full.
// For tables without decay (the fleet's counts are not decayed).
int arm_raise_counts(ArmTable* table, const IdRef* ids, const uint64_t* impressions, const double* rewards,
                     std::size_t n, double prior_alpha, double prior_beta, std::size_t* n_failed) noexcept;

// For i < n: raises the counts of ids[i] to at least impressions[i] and rewards[i], forward-decayed sums relative to
// the landmark landmarks[i] (unix time), each converted to its count's own landmark (times 2**((landmarks[i] -
// own) / H)) before the atomic max, with the compare-and-swap that keeps the count's parity. For tables with decay:
// the fleet's forward-decayed sums only grow too, so readings may be applied in any order and more than once.
// *n_failed counts ids not recorded because the table was full. Only for a table with decay (half_life_s > 0).
int arm_raise_decayed(ArmTable* table, const IdRef* ids, const double* impressions, const double* rewards,
                      const double* landmarks, std::size_t n, double prior_alpha, double prior_beta,
                      std::size_t* n_failed) noexcept;

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
