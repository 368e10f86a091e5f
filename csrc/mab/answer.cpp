#include "mab/answer.hpp"

#include <cfloat>
#include <charconv>
#include <cmath>
#include <cstring>

#include "yyjson/yyjson.h"

namespace mab {
namespace {

constexpr unsigned kUserId = 1, kCandidates = 2, kTopK = 4, kSeed = 8, kEventId = 16, kSegment = 32;

unsigned field_of(const char* key, std::size_t size) noexcept {
  switch (size) {
    case 4:
      return std::memcmp(key, "seed", 4) == 0 ? kSeed : 0;
    case 5:
      return std::memcmp(key, "top_k", 5) == 0 ? kTopK : 0;
    case 7:
      if (std::memcmp(key, "user_id", 7) == 0) return kUserId;
      return std::memcmp(key, "segment", 7) == 0 ? kSegment : 0;
    case 8:
      return std::memcmp(key, "event_id", 8) == 0 ? kEventId : 0;
    case 10:
      return std::memcmp(key, "candidates", 10) == 0 ? kCandidates : 0;
    default:
      return 0;
  }
}

// Characters of UTF-8 text (valid: yyjson checked it): the bytes that do not continue a character.
std::size_t utf8_chars(const char* data, std::size_t size) noexcept {
  std::size_t chars = 0;
  for (std::size_t i = 0; i < size; ++i) chars += (static_cast<unsigned char>(data[i]) & 0xC0) != 0x80;
  return chars;
}

// The event id rule (mab_service/ids.py EVENT_ID): 1 to max_chars of A-Z a-z 0-9 . _ : - (ASCII: chars are bytes)
bool is_event_id(const char* data, std::size_t size, std::size_t max_chars) noexcept {
  if (size == 0 || size > max_chars) return false;
  for (std::size_t i = 0; i < size; ++i) {
    const unsigned char c = static_cast<unsigned char>(data[i]);
    const bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' ||
                    c == '_' || c == ':' || c == '-';
    if (!ok) return false;
  }
  return true;
}

// A present, non-null value of a string field, or false to fall back.
bool string_view_of(yyjson_val* value, IdRef* out) noexcept {
  if (!yyjson_is_str(value)) return false;
  out->data = yyjson_get_str(value);
  out->size = yyjson_get_len(value);
  return true;
}

template <std::size_t N>
void put(std::string& out, const char (&text)[N]) {
  out.append(text, N - 1);
}

void put_string(std::string& out, IdRef s) {
  out.push_back('"');
  out.append(s.data, s.size);
  out.push_back('"');
}

void put_double(std::string& out, double value) {
  char buffer[kDoubleChars];
  out.append(buffer, format_double(value, buffer));
}

}  // namespace

int predict_parse(const char* data, std::size_t size, const PredictRules& rules, void* pool, std::size_t pool_size,
                  PredictBody* out) noexcept {
  out->doc = nullptr;
  if (size == 0 || std::memchr(data, '\\', size) != nullptr) return kPredictFallback;
  yyjson_alc alc;
  const yyjson_alc* use = nullptr;
  if (yyjson_read_max_memory_usage(size, YYJSON_READ_NOFLAG) <= pool_size && yyjson_alc_pool_init(&alc, pool, pool_size)) {
    use = &alc;
  }
  yyjson_doc* doc = yyjson_read_opts(const_cast<char*>(data), size, YYJSON_READ_NOFLAG, use, nullptr);
  if (doc == nullptr) return kPredictFallback;
  out->doc = doc;
  yyjson_val* root = yyjson_doc_get_root(doc);
  if (!yyjson_is_obj(root)) return predict_free(out), kPredictFallback;
  out->candidates = nullptr;
  out->n_candidates = 0;
  out->user_id = IdRef{nullptr, 0};
  out->event_id = IdRef{nullptr, 0};
  out->segment = IdRef{nullptr, 0};
  out->top_k = 0;
  out->seed = 0;
  out->has_seed = false;
  unsigned seen = 0;
  yyjson_obj_iter iter = yyjson_obj_iter_with(root);
  yyjson_val* key;
  while ((key = yyjson_obj_iter_next(&iter)) != nullptr) {
    const unsigned field = field_of(yyjson_get_str(key), yyjson_get_len(key));
    if (field == 0 || (seen & field) != 0) return predict_free(out), kPredictFallback;
    seen |= field;
    yyjson_val* value = yyjson_obj_iter_get_val(key);
    if (yyjson_is_null(value) && field != kUserId && field != kCandidates) continue;
    bool ok = true;
    switch (field) {
      case kUserId:
        ok = string_view_of(value, &out->user_id) &&
             utf8_chars(out->user_id.data, out->user_id.size) <= rules.max_user_id_chars;
        break;
      case kCandidates:
        ok = yyjson_is_arr(value) && yyjson_arr_size(value) >= 1 && yyjson_arr_size(value) <= rules.max_candidates;
        out->candidates = value;
        out->n_candidates = yyjson_arr_size(value);
        break;
      case kTopK:
        ok = yyjson_is_uint(value) && yyjson_get_uint(value) >= 1;
        out->top_k = ok ? yyjson_get_uint(value) : 0;
        break;
      case kSeed:
        ok = yyjson_is_uint(value);
        out->seed = ok ? yyjson_get_uint(value) : 0;
        out->has_seed = ok;
        break;
      case kEventId:
        ok = string_view_of(value, &out->event_id) &&
             is_event_id(out->event_id.data, out->event_id.size, rules.max_event_id_chars);
        break;
      default:  // kSegment: the id rule, at most max_segment_bytes bytes
        ok = string_view_of(value, &out->segment) && first_bad_id(&out->segment, 1, rules.max_segment_bytes) == 1;
        break;
    }
    if (!ok) return predict_free(out), kPredictFallback;
  }
  if ((seen & (kUserId | kCandidates)) != (kUserId | kCandidates)) return predict_free(out), kPredictFallback;
  return kPredictParsed;
}

int predict_candidates(const PredictBody* body, const PredictRules& rules, IdRef* ids) noexcept {
  yyjson_arr_iter iter = yyjson_arr_iter_with(static_cast<yyjson_val*>(body->candidates));
  yyjson_val* value;
  std::size_t i = 0;
  while ((value = yyjson_arr_iter_next(&iter)) != nullptr) {
    if (!string_view_of(value, &ids[i])) return kPredictFallback;
    ++i;
  }
  return first_bad_id(ids, i, rules.max_id_bytes) == i ? kPredictParsed : kPredictFallback;
}

void predict_free(PredictBody* body) noexcept {
  if (body->doc != nullptr) yyjson_doc_free(static_cast<yyjson_doc*>(body->doc));
  body->doc = nullptr;
}

std::size_t format_double(double value, char* out) noexcept {
  // orjson's form: the shortest digits d1..dn that read back as `value`, with the point at position kk (value =
  // 0.d1..dn x 10^kk): plain for -5 < kk <= 16 (a whole number keeps ".0"), else d1[.d2..dn]e(+|-)X.
  char* p = out;
  if (std::signbit(value)) *p++ = '-', value = -value;
  if (value == 0.0) return static_cast<std::size_t>(p - out) + (std::memcpy(p, "0.0", 3), 3);
  char sci[kDoubleChars];
  const auto done = std::to_chars(sci, sci + sizeof(sci), value, std::chars_format::scientific);
  const char* e = static_cast<const char*>(std::memchr(sci, 'e', static_cast<std::size_t>(done.ptr - sci)));
  char digits[24];
  std::size_t n = 0;
  for (const char* q = sci; q < e; ++q) {
    if (*q != '.') digits[n++] = *q;
  }
  int exponent = 0;
  std::from_chars(e + (e[1] == '+' ? 2 : 1), done.ptr, exponent);
  const int kk = exponent + 1;
  if (kk > 0 && kk <= 16) {
    const std::size_t whole = static_cast<std::size_t>(kk);
    if (n <= whole) {
      std::memcpy(p, digits, n);
      p += n;
      std::memset(p, '0', whole - n);
      p += whole - n;
      std::memcpy(p, ".0", 2);
      p += 2;
    } else {
      std::memcpy(p, digits, whole);
      p += whole;
      *p++ = '.';
      std::memcpy(p, digits + whole, n - whole);
      p += n - whole;
    }
  } else if (kk > -5 && kk <= 0) {
    *p++ = '0';
    *p++ = '.';
    std::memset(p, '0', static_cast<std::size_t>(-kk));
    p += -kk;
    std::memcpy(p, digits, n);
    p += n;
  } else {
    *p++ = digits[0];
    if (n > 1) {
      *p++ = '.';
      std::memcpy(p, digits + 1, n - 1);
      p += n - 1;
    }
    *p++ = 'e';
    *p++ = exponent < 0 ? '-' : '+';
    p = std::to_chars(p, out + kDoubleChars, exponent < 0 ? -exponent : exponent).ptr;
  }
  return static_cast<std::size_t>(p - out);
}

void write_answer(std::string& out, IdRef user_id, const IdRef* ids, const int64_t* ranking, const double* scores,
                  std::size_t k, IdRef event_id) noexcept {
  put(out, "{\"user_id\":");
  put_string(out, user_id);
  put(out, ",\"ids\":[");
  for (std::size_t i = 0; i < k; ++i) {
    if (i) out.push_back(',');
    put_string(out, ids[ranking[i]]);
  }
  put(out, "],\"scores\":[");
  for (std::size_t i = 0; i < k; ++i) {
    if (i) out.push_back(',');
    put_double(out, scores[i]);
  }
  put(out, "],\"degraded\":false");
  if (event_id.size) {
    put(out, ",\"event_id\":");
    put_string(out, event_id);
  }
  out.push_back('}');
}

void write_journal_event(std::string& out, double t, IdRef event_id, const IdRef* ids, const int64_t* ranking,
                         std::size_t held, IdRef segment) noexcept {
  put(out, "[\"e\",");
  put_double(out, t);
  out.push_back(',');
  put_string(out, event_id);
  put(out, ",[");
  for (std::size_t i = 0; i < held; ++i) {
    if (i) out.push_back(',');
    put_string(out, ids[ranking[i]]);
  }
  out.push_back(']');
  if (segment.size) {
    out.push_back(',');
    put_string(out, segment);
  }
  out.push_back(']');
}

void write_unnamed(std::string& out, const IdRef* ids, const int32_t* rows, std::size_t n) noexcept {
  bool first = true;
  for (std::size_t i = 0; i < n; ++i) {
    if (rows[i] >= 0) continue;
    if (!first) out.push_back('\0');
    first = false;
    out.append(ids[i].data, ids[i].size);
  }
}

namespace {

bool fits_float(double x) noexcept {
  // Within float's range first (converting past it is undefined), and NaN never.
  return -FLT_MAX <= x && x <= FLT_MAX && static_cast<double>(static_cast<float>(x)) == x;
}

}  // namespace

bool write_decision_arrays(std::string& out, const double* alpha, const double* beta, std::size_t n,
                           const int64_t* ranking, std::size_t k, bool wide) noexcept {
  bool narrow = true;
  for (std::size_t i = 0; i < n && narrow; ++i) narrow = fits_float(alpha[i]) && fits_float(beta[i]);
  const std::size_t start = out.size();
  const std::size_t pairs = 2 * n * (narrow ? sizeof(float) : sizeof(double));
  out.resize(start + pairs + k * (wide ? sizeof(uint32_t) : sizeof(uint16_t)));
  char* at = &out[start];
  if (narrow) {
    float* f = reinterpret_cast<float*>(at);  // std::string's buffer is suitably aligned for any scalar
    for (std::size_t i = 0; i < n; ++i) f[i] = static_cast<float>(alpha[i]);
    for (std::size_t i = 0; i < n; ++i) f[n + i] = static_cast<float>(beta[i]);
  } else {
    std::memcpy(at, alpha, n * sizeof(double));
    std::memcpy(at + n * sizeof(double), beta, n * sizeof(double));
  }
  at += pairs;
  for (std::size_t i = 0; i < k; ++i) {
    if (wide) {
      const uint32_t r = static_cast<uint32_t>(ranking[i]);
      std::memcpy(at + i * sizeof r, &r, sizeof r);
    } else {
      const uint16_t r = static_cast<uint16_t>(ranking[i]);
      std::memcpy(at + i * sizeof r, &r, sizeof r);
    }
  }
  return narrow;
}

}  // namespace mab
