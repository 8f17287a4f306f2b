// SPDX-License-Identifier: LGPL-2.1-or-later
// The console's window: key supplies (table and consumption chart), streams, transfers
// (the seed's job table with start/abort/delete), alerts.
#pragma once

#include <QChart>
#include <QLineSeries>
#include <QMainWindow>
#include <QTableView>
#include <QValueAxis>
#include <map>

#include "console.hpp"

class QLabel;
class QListView;
class QPushButton;

namespace otpgate::console {

class MainWindow : public QMainWindow {
  Q_OBJECT
 public:
  explicit MainWindow(QWidget* parent = nullptr);
  void add_service(ServicePoller::Kind kind, const QUrl& url, int poll_ms = 1000);

  KeySupplyModel& key_supplies() { return key_supplies_; }
  StreamModel& streams() { return streams_; }
  JobModel& jobs() { return jobs_; }
  AlertLog& alerts() { return alerts_; }
  QTableView* job_view() { return job_view_; }
  QPushButton* start_button() { return start_; }
  QPushButton* abort_button() { return abort_; }
  QPushButton* delete_button() { return delete_; }
  std::vector<ServicePoller*> services() const { return services_; }
  bool confirm_deletes = true;  // tests answer the confirmation themselves

 private:
  void on_gateway(ServicePoller* service, const QJsonObject& status);
  void job_action(const QString& action);
  void update_service_label();

  KeySupplyModel key_supplies_;
  StreamModel streams_;
  JobModel jobs_;
  AlertLog alerts_;
  std::vector<ServicePoller*> services_;
  QTableView* job_view_ = nullptr;
  QPushButton *start_ = nullptr, *abort_ = nullptr, *delete_ = nullptr;
  QLabel* services_label_ = nullptr;
  QChart* chart_ = nullptr;
  QValueAxis *x_axis_ = nullptr, *y_axis_ = nullptr;
  // Consumption and refill history per site (totals) and per key supply; the chart shows
  // the selected supply, or every site's totals when none is selected.
  struct History {
    QList<QPointF> consumption, refill;
    double last_fetched = -1;
    qint64 last_ms = 0;
  };
  void record(const QString& key, double consumption_bps, double fetched_bytes, qint64 now);
  void redraw();
  std::map<QString, History> history_;
  std::map<QString, std::pair<QLineSeries*, QLineSeries*>> shown_;
  QString selected_supply_;  // "site|stream|direction", empty: site totals
  QTableView* key_view_ = nullptr;
  qint64 started_ms_ = 0;
};

}  // namespace otpgate::console
