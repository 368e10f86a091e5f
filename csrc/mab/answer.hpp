// The native /predict path's own parts: reading a request body and writing the answer, the journal's event record
// and the decision log's record, without a Python object per candidate. The tables (arm_table.hpp, event_ring.hpp)
// and the kernel (kernel.hpp) do the rest; mab_service/learning/_answer.pyx strings them together in one call.
//
// The body is read with yyjson (csrc/yyjson, MIT), strict RFC 8259. predict_parse takes only bodies whose answer it
// can give exactly as the Python path would (schemas.decode_predict), and says kPredictFallback for every other
// one: then the Python path decodes the body and answers, or names what is wrong in the same words as always. So the
// native path never has an error message of its own. It takes a body when:
//   - it is a JSON object with no backslash anywhere (no escapes: every string is its own bytes, which the answer
//     can echo as they are, and no lone surrogate can hide in one);
//   - its keys are among user_id, candidates, top_k, seed, event_id and segment, each at most once;
//   - user_id is a string of at most max_user_id_chars characters; candidates an array of 1 to max_candidates
//     strings, each keeping the id rule; top_k and seed absent, null or unsigned integers (top_k >= 1); event_id absent,
//     null or of the event id rule; segment absent, null or of the segment rule.
// The strings' bytes are views into the document, which lives until predict_free.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "mab/id_index.hpp"

namespace mab {

enum PredictParse : int {
  kPredictParsed = 0,
  kPredictFallback = 1,
};

// The contract's limits (mab_service/ids.py, schemas.py), handed in from Python so that they are written once.
struct PredictRules {
  std::size_t max_candidates;
  std::size_t max_id_bytes;
  std::size_t max_user_id_chars;
  std::size_t max_event_id_chars;
  std::size_t max_segment_bytes;
};

struct PredictBody {
  void* doc;          // yyjson_doc*, owned; predict_free releases it
  void* candidates;   // yyjson_val* of the candidates array
  std::size_t n_candidates;
  IdRef user_id;
  IdRef event_id;     // size 0: none
  IdRef segment;      // size 0: none
  uint64_t top_k;     // 0: none
  uint64_t seed;
  bool has_seed;
};

// Parses `data` (its size bytes) into *out, or says kPredictFallback (out->doc is then null). `pool`, of pool_size
// bytes, is the document's memory when it is large enough, so that a request allocates nothing.
int predict_parse(const char* data, std::size_t size, const PredictRules& rules, void* pool, std::size_t pool_size,
                  PredictBody* out) noexcept;

// The candidates' views, in order, into ids[0..n_candidates); kPredictFallback if one is not a string keeping the id
// rule.
int predict_candidates(const PredictBody* body, const PredictRules& rules, IdRef* ids) noexcept;

void predict_free(PredictBody* body) noexcept;

// A double as orjson writes it (shortest round trip; "0.00001", "1e-6", "1765150000.25", "1e+16"). Writes at most
// kDoubleChars bytes; returns how many.
constexpr std::size_t kDoubleChars = 32;
std::size_t format_double(double value, char* out) noexcept;

// {"user_id":..,"ids":[..],"scores":[..],"degraded":false,"event_id":..} as routes.predict encodes it with orjson:
// ids[ranking[i]] and scores[i] for i < k. Strings are written as they are (predict_parse took no escapes).
void write_answer(std::string& out, IdRef user_id, const IdRef* ids, const int64_t* ranking, const double* scores,
                  std::size_t k, IdRef event_id) noexcept;

// The journal's event record's payload as orjson writes ("e", t, event_id, [ids...]) or with the segment after them.
void write_journal_event(std::string& out, double t, IdRef event_id, const IdRef* ids, const int64_t* ranking,
                         std::size_t held, IdRef segment) noexcept;

// The ids whose row is -1, in order, with a NUL between two (decisions.py, the ROWS blob).
void write_unnamed(std::string& out, const IdRef* ids, const int32_t* rows, std::size_t n) noexcept;

// The decision record's arrays after its rows (decisions.py, version 2): alpha and beta (as f32 when every one of
// them is exactly a float32, else f64), then the ranking (u32 when `wide`, else u16). Returns whether they went as
// f32 (the NARROW flag).
bool write_decision_arrays(std::string& out, const double* alpha, const double* beta, std::size_t n,
                           const int64_t* ranking, std::size_t k, bool wide) noexcept;

}  // namespace mab
