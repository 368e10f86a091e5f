package main

import (
	"encoding/csv"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"strconv"
	"strings"
)

const maxReportedErrors = 20

// table holds the Beta posteriors loaded at start: id -> row, and the parameters in two flat arrays so the
// gather loop reads them without pointer chasing.
type table struct {
	rows  map[string]int32
	alpha []float64
	beta  []float64
}

// loadTable reads a CSV with the header entity_id,alpha,beta (more columns are ignored), as mab_service
// does: every line is checked and every bad one reported, and a bad file stops the start.
func loadTable(path string) (*table, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	reader := csv.NewReader(f)
	reader.ReuseRecord = true
	reader.FieldsPerRecord = -1 // short rows are reported below with their line number
	header, err := reader.Read()
	if err != nil {
		return nil, fmt.Errorf("%s: cannot read the header entity_id,alpha,beta: %w", path, err)
	}
	column := map[string]int{}
	for i, name := range header {
		column[strings.TrimSpace(name)] = i
	}
	idCol, okID := column["entity_id"]
	alphaCol, okAlpha := column["alpha"]
	betaCol, okBeta := column["beta"]
	if !okID || !okAlpha || !okBeta {
		return nil, fmt.Errorf("%s: line 1: the header must hold entity_id, alpha and beta (got %s)",
			path, strings.Join(header, ","))
	}
	need := max3(idCol, alphaCol, betaCol) + 1

	t := &table{rows: map[string]int32{}}
	var problems []string
	report := func(line int, format string, args ...any) {
		problems = append(problems, fmt.Sprintf("line %d: %s", line, fmt.Sprintf(format, args...)))
	}
	for {
		record, err := reader.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		line, _ := reader.FieldPos(0)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		if len(record) < need {
			report(line, "expected at least %d fields, got %d", need, len(record))
			continue
		}
		id := record[idCol]
		a, errA := parseParameter(record[alphaCol])
		b, errB := parseParameter(record[betaCol])
		switch {
		case id == "":
			report(line, "empty entity_id")
		case errA != nil:
			report(line, "alpha %v", errA)
		case errB != nil:
			report(line, "beta %v", errB)
		default:
			if _, dup := t.rows[id]; dup {
				report(line, "duplicate entity_id %q", id)
				continue
			}
			t.rows[strings.Clone(id)] = int32(len(t.alpha)) // Clone: ReuseRecord recycles the backing bytes
			t.alpha = append(t.alpha, a)
			t.beta = append(t.beta, b)
		}
	}
	if n := len(problems); n > 0 {
		if n > maxReportedErrors {
			problems = append(problems[:maxReportedErrors], fmt.Sprintf("... and %d more", n-maxReportedErrors))
		}
		return nil, fmt.Errorf("%s: %d bad line(s):\n  %s", path, n, strings.Join(problems, "\n  "))
	}
	if len(t.alpha) > math.MaxInt32 {
		return nil, fmt.Errorf("%s: more than %d rows", path, math.MaxInt32)
	}
	return t, nil
}

func parseParameter(text string) (float64, error) {
	v, err := strconv.ParseFloat(strings.TrimSpace(text), 64)
	if err != nil {
		return 0, fmt.Errorf("must be a number (got %q)", text)
	}
	if !(v > 0) || math.IsInf(v, 0) {
		return 0, fmt.Errorf("must be a finite number > 0 (got %q)", text)
	}
	return v, nil
}

func max3(a, b, c int) int {
	if b > a {
		a = b
	}
	if c > a {
		a = c
	}
	return a
}
