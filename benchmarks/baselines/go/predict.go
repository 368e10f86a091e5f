package main

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"unicode/utf8"

	"github.com/valyala/fasthttp"
)

const maxUserIDChars = 1024

// limits are the request limits and the prior, as mab_service's settings of the same names.
type limits struct {
	priorAlpha, priorBeta float64
	maxCandidates         int
	maxBodyBytes          int
}

// predictRequest is the POST /predict body. Pointers tell a missing field from a zero value.
type predictRequest struct {
	UserID     *string  `json:"user_id"`
	Candidates []string `json:"candidates"`
	TopK       *int     `json:"top_k"`
	Seed       *uint64  `json:"seed"`
}

type predictResponse struct {
	UserID string    `json:"user_id"`
	IDs    []string  `json:"ids"`
	Scores []float64 `json:"scores"`
}

type errorBody struct {
	Error   string `json:"error"`
	Message string `json:"message"`
	Field   string `json:"field,omitempty"`
}

// apiError is every answer other than 200, with mab_service's status codes and error codes.
type apiError struct {
	status int
	body   errorBody
}

func (e *apiError) Error() string { return e.body.Message }

func newError(status int, code, field, format string, args ...any) *apiError {
	return &apiError{status, errorBody{code, fmt.Sprintf(format, args...), field}}
}

func invalid(field, format string, args ...any) *apiError {
	return newError(fasthttp.StatusUnprocessableEntity, "validation_error", field, format, args...)
}

// scratch is everything one request needs besides its answer, reused through a sync.Pool: after warm-up
// a request allocates only what encoding/json makes (the decoded strings and pointers).
type scratch struct {
	req     predictRequest
	ids     []string  // distinct candidates in the order of their first occurrence
	alpha   []float64 // their parameters, the prior for unknown ids
	beta    []float64
	scores  []float64
	order   []int32  // indices into ids, best first
	seen    []uint32 // seen[row] == stamp: the table row is already among ids
	stamp   uint32
	unknown map[string]struct{} // unknown ids already among ids
	stream  rng                 // this scratch's own stream, for requests without a seed
	seeded  rng                 // reseeded by each request with a seed, so seeds never touch stream
	resp    predictResponse
	out     bytes.Buffer
	enc     *json.Encoder
}

// service serves /predict and /health from one table. The only state shared between requests is the
// read-only table; the random streams live in the pooled scratch, so no draw takes a lock.
type service struct {
	table   *table
	limits  limits
	pool    sync.Pool
	entropy uint64
	streams uint64 // scratch objects created, atomically: each gets its own stream
}

func newService(t *table, l limits) *service {
	var seed [8]byte
	if _, err := rand.Read(seed[:]); err != nil {
		panic(fmt.Sprintf("no entropy for the random streams: %v", err))
	}
	s := &service{table: t, limits: l, entropy: binary.LittleEndian.Uint64(seed[:])}
	s.pool.New = func() any { return s.newScratch() }
	return s
}

func (s *service) newScratch() *scratch {
	sc := &scratch{seen: make([]uint32, len(s.table.alpha)), unknown: map[string]struct{}{}}
	// splitmix64 in seed() decorrelates consecutive seeds, so entropy + counter gives independent streams.
	sc.stream.seed(s.entropy + atomic.AddUint64(&s.streams, 1))
	sc.enc = json.NewEncoder(&sc.out)
	sc.enc.SetEscapeHTML(false) // as orjson: ids go out as they came in
	return sc
}

// handle routes a request. fasthttp does not recover panics, so a panic becomes a logged 500 here.
func (s *service) handle(ctx *fasthttp.RequestCtx) {
	defer func() {
		if p := recover(); p != nil {
			log.Printf("panic serving %s %s: %v\n%s", ctx.Method(), ctx.Path(), p, debug.Stack())
			writeError(ctx, newError(fasthttp.StatusInternalServerError, "internal_error", "", "internal server error"))
		}
	}()
	switch string(ctx.Path()) { // the compiler does not allocate for a string conversion in a switch
	case "/predict":
		if !ctx.IsPost() {
			methodNotAllowed(ctx, "POST")
			return
		}
		s.predict(ctx)
	case "/health":
		if !ctx.IsGet() && !ctx.IsHead() {
			methodNotAllowed(ctx, "GET, HEAD")
			return
		}
		// The table is loaded before the server listens, so whoever can connect gets ready.
		ctx.SetContentType("application/json")
		ctx.SetBodyString(`{"status":"ok"}`)
	default:
		writeError(ctx, newError(fasthttp.StatusNotFound, "not_found", "", "not found"))
	}
}

// handleTransportError answers requests fasthttp rejects before the handler, in the same JSON.
func (s *service) handleTransportError(ctx *fasthttp.RequestCtx, err error) {
	if errors.Is(err, fasthttp.ErrBodyTooLarge) {
		writeError(ctx, newError(fasthttp.StatusRequestEntityTooLarge, "payload_too_large", "",
			"body must be at most %d bytes", s.limits.maxBodyBytes))
		return
	}
	writeError(ctx, newError(fasthttp.StatusBadRequest, "bad_request", "", "cannot read the request: %v", err))
}

func (s *service) predict(ctx *fasthttp.RequestCtx) {
	contentType := ctx.Request.Header.ContentType()
	if i := bytes.IndexByte(contentType, ';'); i >= 0 {
		contentType = contentType[:i]
	}
	if !bytes.EqualFold(bytes.TrimSpace(contentType), []byte("application/json")) {
		shown := string(ctx.Request.Header.ContentType())
		if shown == "" {
			shown = "none"
		}
		writeError(ctx, newError(fasthttp.StatusUnsupportedMediaType, "unsupported_media_type", "",
			"content type must be application/json (got %s)", shown))
		return
	}
	sc := s.pool.Get().(*scratch)
	defer s.pool.Put(sc)
	if err := s.rank(sc, ctx.PostBody()); err != nil {
		writeError(ctx, err)
		return
	}
	sc.out.Reset()
	if err := sc.enc.Encode(&sc.resp); err != nil {
		panic(err) // strings and finite floats always encode
	}
	ctx.SetContentType("application/json")
	ctx.SetBody(sc.out.Bytes()) // copies: sc goes back to the pool before fasthttp writes the answer
}

// rank decodes and checks the body, then fills sc.resp: dedupe -> gather -> sample -> top k.
func (s *service) rank(sc *scratch, body []byte) *apiError {
	req := &sc.req
	req.UserID, req.TopK, req.Seed = nil, nil, nil
	req.Candidates = req.Candidates[:0] // Unmarshal appends into the old array
	if err := json.Unmarshal(body, req); err != nil {
		return decodeError(err)
	}
	if req.UserID == nil {
		return invalid("user_id", "user_id must be a string (missing)")
	}
	if utf8.RuneCountInString(*req.UserID) > maxUserIDChars {
		return invalid("user_id", "user_id must be at most %d characters", maxUserIDChars)
	}
	if len(req.Candidates) == 0 {
		return invalid("candidates", "candidates must be a non-empty array of strings")
	}
	if n := len(req.Candidates); n > s.limits.maxCandidates {
		return invalid("candidates", "candidates must hold at most %d ids (got %d)", s.limits.maxCandidates, n)
	}
	if req.TopK != nil && *req.TopK < 1 {
		return invalid("top_k", "top_k must be an integer >= 1 (got %d)", *req.TopK)
	}

	s.gather(sc)
	r := &sc.stream
	if req.Seed != nil {
		sc.seeded.seed(*req.Seed)
		r = &sc.seeded
	}
	sc.scores = sc.scores[:0]
	for i := range sc.ids {
		sc.scores = append(sc.scores, r.beta(sc.alpha[i], sc.beta[i]))
	}
	k := len(sc.ids)
	if req.TopK != nil && *req.TopK < k {
		k = *req.TopK
	}
	sc.order = topK(sc.scores, k, sc.order)

	sc.resp.UserID = *req.UserID
	sc.resp.IDs, sc.resp.Scores = sc.resp.IDs[:0], sc.resp.Scores[:0]
	for _, i := range sc.order {
		sc.resp.IDs = append(sc.resp.IDs, sc.ids[i])
		sc.resp.Scores = append(sc.resp.Scores, sc.scores[i])
	}
	return nil
}

// gather keeps the first occurrence of each candidate and looks up its parameters. Known ids are
// deduplicated by stamping their table row, which costs no hashing beyond the lookup itself; only
// unknown ids need a set.
func (s *service) gather(sc *scratch) {
	sc.stamp++
	if sc.stamp == 0 { // wrapped after 2^32 requests: forget every old stamp
		for i := range sc.seen {
			sc.seen[i] = 0
		}
		sc.stamp = 1
	}
	sc.ids, sc.alpha, sc.beta = sc.ids[:0], sc.alpha[:0], sc.beta[:0]
	t := s.table
	for _, id := range sc.req.Candidates {
		if row, ok := t.rows[id]; ok {
			if sc.seen[row] == sc.stamp {
				continue
			}
			sc.seen[row] = sc.stamp
			sc.alpha = append(sc.alpha, t.alpha[row])
			sc.beta = append(sc.beta, t.beta[row])
		} else {
			if _, dup := sc.unknown[id]; dup {
				continue
			}
			sc.unknown[id] = struct{}{}
			sc.alpha = append(sc.alpha, s.limits.priorAlpha)
			sc.beta = append(sc.beta, s.limits.priorBeta)
		}
		sc.ids = append(sc.ids, id)
	}
	for id := range sc.unknown {
		delete(sc.unknown, id) // compiled to one map clear
	}
}

var expected = map[string]string{
	"user_id":    "a string",
	"candidates": "an array of strings",
	"top_k":      "an integer >= 1",
	"seed":       "an integer in [0, 2**64)",
}

func decodeError(err error) *apiError {
	var syntax *json.SyntaxError
	var wrongType *json.UnmarshalTypeError
	switch {
	case errors.As(err, &syntax):
		return newError(fasthttp.StatusBadRequest, "malformed_json", "", "body is not valid JSON: %v", err)
	case errors.As(err, &wrongType) && wrongType.Field == "":
		return invalid("", "body must be a JSON object (got %s)", wrongType.Value)
	case errors.As(err, &wrongType):
		field := wrongType.Field
		if what, ok := expected[field]; ok {
			return invalid(field, "%s must be %s (got %s)", field, what, wrongType.Value)
		}
		return invalid(field, "%s has the wrong type (got %s)", field, wrongType.Value)
	default:
		return newError(fasthttp.StatusBadRequest, "malformed_json", "", "body is not valid JSON: %v", err)
	}
}

func writeError(ctx *fasthttp.RequestCtx, e *apiError) {
	body, err := json.Marshal(e.body)
	if err != nil {
		panic(err) // three strings always encode
	}
	ctx.SetStatusCode(e.status)
	ctx.SetContentType("application/json")
	ctx.SetBody(body)
}

func methodNotAllowed(ctx *fasthttp.RequestCtx, allow string) {
	ctx.Response.Header.Set("Allow", allow)
	writeError(ctx, newError(fasthttp.StatusMethodNotAllowed, "method_not_allowed", "", "method not allowed"))
}
